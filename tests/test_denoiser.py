"""EDM preconditioning and loss, checked against their defining identities and a closed form."""
import math

import pytest
import torch

from dmd_minimal.denoiser import Denoiser, as_sigma, denoising_loss, edm_loss, score
from dmd_minimal.gaussian import isotropic_gaussian
from dmd_minimal.networks import build_denoiser

SHAPES = [(2,), (3, 4, 4)]


class Recorder(torch.nn.Module):
    """A backbone that remembers its input and returns a fixed nonlinear function of it."""

    def forward(self, x, noise_labels, class_labels=None):
        self.x_in, self.noise_labels = x, noise_labels
        return torch.tanh(x) + noise_labels.reshape(-1, *[1] * (x.ndim - 1))


class Constant(torch.nn.Module):
    """A backbone whose output F is `value` everywhere: then D(x; sigma) = c_skip x + c_out value."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, noise_labels, class_labels=None):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_constant_backbone_exposes_c_skip_and_c_out(sigma_data):
    sigmas = [0.002, 0.1, 0.5, 1.0, 3.0, 80.0]
    x = torch.ones(len(sigmas), 3, 2, 2)
    c_skip = Denoiser(Constant(0.0), sigma_data)(x, torch.tensor(sigmas))[:, 0, 0, 0]       # x = 1, F = 0
    c_out = Denoiser(Constant(1.0), sigma_data)(0 * x, torch.tensor(sigmas))[:, 0, 0, 0]    # x = 0, F = 1
    expected_skip = [sigma_data**2 / (s**2 + sigma_data**2) for s in sigmas]                # EDM Table 1
    expected_out = [s * sigma_data / math.sqrt(s**2 + sigma_data**2) for s in sigmas]
    torch.testing.assert_close(c_skip, torch.tensor(expected_skip), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_out, torch.tensor(expected_out), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_small_sigma_returns_input(shape):
    D = Denoiser(Recorder(), sigma_data=0.5)
    x = torch.randn(8, *shape)
    assert torch.allclose(D(x, 1e-6), x, atol=1e-5)   # c_skip -> 1, c_out -> 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sigma", [0.01, 1.0, 50.0])
def test_c_in_gives_unit_variance(shape, sigma):
    sigma_data = 0.7
    D = Denoiser(Recorder(), sigma_data=sigma_data)
    x = sigma_data * torch.randn(20000, *shape)
    D(x + sigma * torch.randn_like(x), sigma)
    assert abs(D.backbone.x_in.std().item() - 1) < 0.02
    assert torch.allclose(D.backbone.noise_labels, torch.full((20000,), torch.tensor(sigma).log().item() / 4))


def test_same_values_for_flat_and_image_shapes():
    D = Denoiser(Recorder(), sigma_data=0.5)
    x = torch.randn(6, 2 * 3 * 5)
    sigma = torch.rand(6) * 10
    assert torch.allclose(D(x, sigma).reshape(6, 2, 3, 5), D(x.reshape(6, 2, 3, 5), sigma), atol=1e-6)


def test_sigma_forms_agree():
    D = build_denoiser("mlp", 1.0, hidden=32, depth=2)
    x = torch.randn(5, 2)
    ref = D(x, torch.full((5,), 0.3))
    for sigma in (0.3, torch.tensor(0.3), torch.tensor([0.3])):
        assert torch.allclose(D(x, sigma), ref)
    assert as_sigma(0.3, x).shape == (5,)


def test_class_labels_integer_equals_one_hot():
    D = build_denoiser("mlp", 1.0, label_dim=4, hidden=32, depth=2)
    torch.nn.init.normal_(D.backbone.label_embed.weight)
    x, labels = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    assert torch.allclose(D(x, 1.0, labels), D(x, 1.0, one_hot))
    assert not torch.allclose(D(x, 1.0, labels), D(x, 1.0))   # no label: the zero vector
    with pytest.raises(ValueError, match="label_dim 4"):
        D(x, 1.0, torch.zeros(6, 3))


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_exact_denoiser_has_unit_edm_loss(sigma):
    """For data N(0, s^2 I) and sigma_data = s, lambda(sigma) times the posterior variance is exactly 1."""
    exact = isotropic_gaussian(dim=2, std=1.5)
    exact.sigma_data = 1.5
    loss = denoising_loss(exact, 1.5 * torch.randn(200000, 2), torch.full((200000,), sigma))
    assert abs(loss.mean().item() - 1) < 0.01
    assert abs(edm_loss(exact, 1.5 * torch.randn(200000, 2)).item() - 1) < 0.01


def test_score_is_scaled_denoiser_residual():
    exact = isotropic_gaussian(dim=2, std=2.0)
    x = torch.randn(4, 2)
    assert torch.allclose(score(exact, x, 1.0), -x / (2.0**2 + 1.0), atol=1e-6)   # score of N(0, 5 I)
