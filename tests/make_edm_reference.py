"""Writes tests/data/edm_reference.pt: the outputs of EDM's own EDMPrecond for test_edm_reference.CASES.

EDM's code comes from a checkout outside this repository; it is imported, never copied:
    git clone https://github.com/NVlabs/edm /tmp/edm
    PYTHONPATH=/tmp/edm:tests python tests/make_edm_reference.py
"""
import torch
from training.networks import EDMPrecond   # EDM's

from test_edm_reference import CASES, REFERENCE, reference_denoiser, reference_inputs


def edm_denoiser(ours):
    """EDM's EDMPrecond with the architecture and the weights of our denoiser `ours` (same parameter names)."""
    config = dict(ours.backbone.config)
    resolution, channels = config.pop("img_resolution"), config.pop("in_channels")
    config.pop("out_channels"), config.pop("label_dim")
    edm = EDMPrecond(resolution, channels, ours.label_dim, use_fp16=False, sigma_data=ours.sigma_data,
                     model_type=type(ours.backbone).__name__, **config)
    edm.model.load_state_dict(ours.backbone.state_dict(), strict=True)
    return edm.eval()


def main():
    outputs = {}
    for case in CASES:
        x, sigma, labels, kwargs = reference_inputs(case)
        with torch.no_grad():
            outputs[case] = edm_denoiser(reference_denoiser(case))(x, sigma, labels, **kwargs).float()
    torch.save(dict(outputs=outputs, torch_version=str(torch.__version__)), REFERENCE)
    print(f"wrote {REFERENCE}: {', '.join(outputs)}")


if __name__ == "__main__":
    main()
