"""Our EDM networks against the outputs of EDM's own code, to float rounding.

tests/data/edm_reference.pt holds D(x; sigma) of EDM's EDMPrecond (NVlabs/edm, training/networks.py) for
each case in CASES: a tiny network of every variant, with the weights reference_denoiser gives it (drawn
from a seed, by parameter name and shape, so our network and EDM's, which share the names, get the same
ones) and on the inputs reference_inputs draws. Only those outputs are committed, never EDM's code.
Remade with tests/make_edm_reference.py (EDM at commit 008a4e5, torch 2.x on a CPU, fp32).
"""
from pathlib import Path

import pytest
import torch

from test_edm_networks import tiny_denoiser

REFERENCE = Path(__file__).parent / "data" / "edm_reference.pt"
CASES = {   # name -> (TINY network, label_dim, augmentation labels)
    "ddpmpp-cond": ("ddpmpp", 10, False),
    "ddpmpp-uncond": ("ddpmpp", 0, False),
    "ddpmpp-augment-cond": ("ddpmpp-augment", 10, True),
    "ncsnpp-cond": ("ncsnpp", 10, False),
    "ncsnpp-uncond": ("ncsnpp", 0, False),
    "songunet-skip-uncond": ("songunet-skip", 0, False),
    "adm-cond": ("adm", 10, False),
    "adm-uncond": ("adm", 0, False),
    "adm-augment-uncond": ("adm-augment", 0, True),
}
SIGMAS = (0.05, 1.0, 80.0)   # one per sample


def reference_denoiser(case):
    """The tiny 8x8 network of `case` (attention at 4x4), every parameter and random buffer seeded."""
    name, label_dim, _ = CASES[case]
    denoiser = tiny_denoiser(name, resolution=8, label_dim=label_dim, seed=list(CASES).index(case))
    map_noise = denoiser.backbone.map_noise
    if hasattr(map_noise, "freqs"):   # NCSN++'s random Fourier frequencies: a buffer, not a parameter
        generator = torch.Generator().manual_seed(len(CASES))
        map_noise.freqs.copy_(16 * torch.randn(map_noise.freqs.shape, generator=generator))
    return denoiser


def reference_inputs(case):
    """x [3, 3, 8, 8] at the noise levels SIGMAS, one-hot class labels, augmentation labels (as kwargs)."""
    _, label_dim, augment = CASES[case]
    generator = torch.Generator().manual_seed(100 + list(CASES).index(case))
    sigma = torch.tensor(SIGMAS)
    x = torch.randn(3, 3, 8, 8, generator=generator) * (sigma**2 + 0.25).sqrt().reshape(-1, 1, 1, 1)
    labels = torch.eye(label_dim)[[1, 4, 7]] if label_dim else None
    kwargs = dict(augment_labels=torch.randn(3, 9, generator=generator)) if augment else {}
    return x, sigma, labels, kwargs


@pytest.fixture(scope="module")
def edm_outputs():
    return torch.load(REFERENCE, weights_only=True)["outputs"]


@pytest.mark.parametrize("case", CASES)
def test_denoiser_matches_edms_own_code(edm_outputs, case):
    x, sigma, labels, kwargs = reference_inputs(case)
    with torch.no_grad():
        D_x = reference_denoiser(case)(x, sigma, labels, **kwargs)
    expected, atol = edm_outputs[case], 1e-5 * edm_outputs[case].abs().max().item()
    c_skip = 0.25 / (sigma**2 + 0.25)                               # sigma_data = 0.5
    network_part = (expected - c_skip.reshape(-1, 1, 1, 1) * x).abs().flatten(1).amax(1)
    assert network_part.min() > 1000 * atol                         # c_out F shows at every sigma
    torch.testing.assert_close(D_x, expected, rtol=1e-5, atol=atol)
