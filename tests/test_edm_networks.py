"""EDM's image networks (SongUNet: DDPM++ / NCSN++, DhariwalUNet: ADM): layout, shapes, conditioning, sampling.

Tiny widths everywhere; the full presets (a slow test) are compared with the layout of EDM's released
networks. test_edm_reference.py compares the outputs with those of EDM's own code.
"""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dmd_minimal import unet_layers
from dmd_minimal.networks import IMAGE_NETWORKS, build_denoiser, denoiser_from_dict, denoiser_to_dict
from dmd_minimal.sampler import sample_ode
from dmd_minimal.unet_layers import BlockStyle, ResidualBlock

TINY = {   # arch kwargs of small networks with every option EDM's train.py uses
    "ddpmpp": dict(arch="songunet", model_channels=16, channel_mult=[1, 2], num_blocks=1),
    "ddpmpp-augment": dict(arch="songunet", model_channels=16, channel_mult=[1, 2], num_blocks=1, augment_dim=9),
    "ncsnpp": dict(arch="songunet", model_channels=16, channel_mult=[1, 2], num_blocks=1, embedding_type="fourier",
                   encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    "songunet-skip": dict(arch="songunet", model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
                          encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1]),
    "adm": dict(arch="dhariwalunet", model_channels=64, channel_mult=[1, 2], num_blocks=1),   # >= 64: attention heads
    "adm-augment": dict(arch="dhariwalunet", model_channels=64, channel_mult=[1, 2], num_blocks=1, augment_dim=9),
}

# Counted with NVlabs/edm's training/networks.py for the released configurations (its state_dict).
EDM_RELEASED = {   # preset, label_dim -> (parameters and buffers, number of tensors)
    ("cifar10", 10): (55_735_331, 427),     # edm-cifar10-32x32-cond-vp.pkl
    ("cifar10", 0): (55_733_923, 425),      # edm-cifar10-32x32-uncond-vp.pkl
    ("imagenet64", 1000): (295_899_315, 553),   # edm-imagenet-64x64-cond-adm.pkl
}


def tiny_denoiser(name, resolution=16, label_dim=0, seed=0):
    """A tiny image denoiser with attention at half resolution and every weight random (none left at zero)."""
    torch.manual_seed(seed)
    kwargs = dict(TINY[name], img_resolution=resolution, attn_resolutions=[resolution // 2], dropout=0.0)
    denoiser = build_denoiser(sigma_data=0.5, label_dim=label_dim, **kwargs)
    return randomize_(denoiser, seed)


def randomize_(module, seed):
    """Overwrite every parameter with a random value of sensible scale: zero-initialised layers hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):                      # GroupNorm gains
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return module.eval()


def extra_inputs(denoiser, batch):
    """Integer class labels and augmentation labels, where the network takes them."""
    labels = torch.arange(batch) % denoiser.label_dim if denoiser.label_dim else None
    augment_dim = denoiser.backbone.config["augment_dim"]
    kwargs = dict(augment_labels=torch.randn(batch, augment_dim)) if augment_dim else {}
    return labels, kwargs


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("label_dim", [0, 10])
def test_state_dict_round_trip_is_strict_and_exact(name, label_dim):
    source = tiny_denoiser(name, label_dim=label_dim, seed=1)
    target = tiny_denoiser(name, label_dim=label_dim, seed=2)
    target.load_state_dict(source.state_dict(), strict=True)
    stored = denoiser_to_dict(source)
    assert stored["arch"] == TINY[name]["arch"]
    rebuilt = denoiser_from_dict(stored).eval()
    x = torch.randn(3, 3, 16, 16)
    labels, kwargs = extra_inputs(source, 3)
    expected = source(x, 1.3, labels, **kwargs)
    assert torch.equal(target(x, 1.3, labels, **kwargs), expected)
    assert torch.equal(rebuilt(x, 1.3, labels, **kwargs), expected)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("resolution", [16, 32])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_output_shape(name, resolution, label_dim):
    denoiser = tiny_denoiser(name, resolution, label_dim)
    x = torch.randn(2, 3, resolution, resolution)
    labels, kwargs = extra_inputs(denoiser, 2)
    with torch.no_grad():
        for sigma in (0.002, 1.0, 80.0):
            D_x = denoiser(x * (1 + sigma), sigma, labels, **kwargs)
            assert D_x.shape == x.shape and torch.isfinite(D_x).all()


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp", "adm"])
def test_class_labels_condition_the_output(name):
    denoiser = tiny_denoiser(name, label_dim=10)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        D_0, D_1 = denoiser(x, 1.0, torch.tensor([0, 0])), denoiser(x, 1.0, torch.tensor([1, 1]))
        one_hot = torch.nn.functional.one_hot(torch.tensor([0, 0]), 10).float()
        assert torch.equal(denoiser(x, 1.0, one_hot), D_0)            # integer labels = one-hot
        assert torch.equal(denoiser(x, 1.0), denoiser(x, 1.0, torch.zeros(2, 10)))   # none = zero vector
    assert (D_0 - D_1).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["ddpmpp-augment", "adm-augment"])
def test_augment_labels_condition_the_output(name):
    denoiser = tiny_denoiser(name)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = denoiser(x, 1.0)
        assert torch.equal(denoiser(x, 1.0, augment_labels=torch.zeros(2, 9)), plain)   # EDM: none = zeros
        assert (denoiser(x, 1.0, augment_labels=torch.randn(2, 9)) - plain).abs().max() > 1e-4


def test_adm_attention_heads_are_channels_over_64():
    blocks = tiny_denoiser("adm").backbone.enc
    assert blocks["8x8_block0"].num_heads == 128 // 64 and blocks["16x16_block0"].num_heads == 0   # no attention at 16
    assert "map_label.bias" not in tiny_denoiser("adm", label_dim=10).backbone.state_dict()


def test_edm_key_names():
    keys = set(tiny_denoiser("ncsnpp", label_dim=10).state_dict())
    for key in ("enc.16x16_conv.weight", "enc.8x8_down.conv0.resample_filter", "enc.8x8_aux_residual.weight",
                "enc.8x8_block0.qkv.weight", "dec.8x8_in0.proj.bias", "dec.16x16_aux_conv.weight",
                "map_noise.freqs", "map_label.weight"):
        assert "backbone." + key in keys


@pytest.mark.slow   # builds the full 56M- and 296M-parameter networks
@pytest.mark.parametrize("preset, label_dim", list(EDM_RELEASED))
def test_presets_match_edm_released_layout(preset, label_dim):
    denoiser = build_denoiser(sigma_data=0.5, label_dim=label_dim, **IMAGE_NETWORKS[preset])
    state = denoiser.backbone.state_dict()
    assert (sum(t.numel() for t in state.values()), len(state)) == EDM_RELEASED[(preset, label_dim)]


@pytest.mark.parametrize("name, label_dim", [("ddpmpp-augment", 10), ("ncsnpp", 0), ("adm", 10)])
@pytest.mark.parametrize("num_steps", [1, 2, 18])
def test_teacher_ode_sampling_is_finite(name, label_dim, num_steps):
    denoiser = tiny_denoiser(name, resolution=8, label_dim=label_dim)
    z = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([3, 7]) if label_dim else None
    x = sample_ode(denoiser, z, num_steps, labels)
    assert x.shape == z.shape and torch.isfinite(x).all()


class SoftmaxInputs(TorchFunctionMode):
    """Records the dtype of every tensor that a softmax receives."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_attention_logits_and_softmax_run_in_fp32_under_bf16_autocast(monkeypatch):
    torch.manual_seed(0)
    block = ResidualBlock(64, 64, BlockStyle(emb_channels=8), attention=True).eval()
    with torch.no_grad():   # q and k biases give every row of logits a common offset of about 32, as trained nets do
        block.qkv.bias[0::3], block.qkv.bias[1::3] = 2.0, 2.0     # qkv's channels are [C, 3]: q, k, v
    x = torch.randn(2, 64, 8, 8)

    def bf16_logits(q, k):   # the attention before the fix: the .float() casts undone by autocast
        return torch.einsum("nci,ncj->nij", q.float(), k.float() / math.sqrt(q.shape[1])).softmax(dim=2)
    with torch.no_grad():
        exact = block.attention(x)
        with torch.autocast("cpu", torch.bfloat16), SoftmaxInputs() as softmax:
            fixed = block.attention(x).float()
            monkeypatch.setattr(unet_layers, "attention_weights", bf16_logits)
            before = block.attention(x).float()
    assert softmax.dtypes == [torch.float32, torch.bfloat16]
    error, error_before = (fixed - exact).abs().max(), (before - exact).abs().max()
    assert error < error_before / 3 and error < 0.03 * exact.abs().max()
