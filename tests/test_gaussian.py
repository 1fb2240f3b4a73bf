"""Exact Gaussian(-mixture) denoisers: Tweedie's formula against autograd of the closed-form density."""
import math

import pytest
import torch

from dmd_minimal.denoiser import score
from dmd_minimal.gaussian import GaussianDenoiser, GaussianMixtureDenoiser
from dmd_minimal.toy2d import exact_denoiser, mixture_centers


def mixture_log_density(x, centers, std, sigma):
    var = std**2 + sigma**2
    sq = (x[:, None, :] - centers[None]).pow(2).sum(-1)          # [B, K]
    return torch.logsumexp(-0.5 * sq / var, dim=1) - 0.5 * x.shape[1] * math.log(var)


@pytest.mark.parametrize("toy", ["grid25", "ring8"])
@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 80.0])
def test_mixture_score_matches_autograd(toy, sigma):
    D = exact_denoiser(toy)
    x = (torch.randn(64, 2) * 3).requires_grad_(True)
    logp = mixture_log_density(x, mixture_centers(toy), D.std, sigma).sum()
    (expected,) = torch.autograd.grad(logp, x)
    assert torch.allclose(score(D, x.detach(), sigma), expected, rtol=1e-3, atol=1e-3 / sigma**2)


@pytest.mark.parametrize("sigma", [0.05, 1.0, 10.0])
def test_mixture_log_prob_is_the_density_whose_gradient_is_the_score(sigma):
    D = GaussianMixtureDenoiser(torch.tensor([[-2.0], [2.0]]), 0.3, weights=[0.3, 0.7])
    x = torch.linspace(-4 - 6 * sigma, 4 + 6 * sigma, 2001)[:, None]
    density = D.log_prob(x, sigma).exp()
    assert torch.allclose(density.sum() * (x[1] - x[0]), torch.tensor(1.0), atol=1e-3)   # a normalised density
    x = x[::50].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(D.log_prob(x, sigma).sum(), x)
    assert torch.allclose(score(D, x.detach(), sigma), expected, rtol=1e-3, atol=1e-4)


def test_mixture_works_on_image_shapes():
    centers = torch.randn(3, 2, 4, 4)
    D = GaussianMixtureDenoiser(centers, 0.2)
    x = torch.randn(5, 2, 4, 4)
    flat = GaussianMixtureDenoiser(centers.flatten(1), 0.2)
    assert torch.allclose(D(x, 0.7), flat(x.flatten(1), 0.7).reshape(x.shape), atol=1e-6)


def test_full_covariance_matches_isotropic_mixture_and_monte_carlo():
    mean = torch.tensor([1.0, -2.0])
    iso = GaussianMixtureDenoiser(mean[None], 0.5)
    full = GaussianDenoiser(mean, 0.25 * torch.eye(2))
    x = torch.randn(10, 2)
    assert torch.allclose(iso(x, 0.8), full(x, 0.8), atol=1e-5)
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]])                    # E[x | x_t] by regression on samples
    D = GaussianDenoiser(mean, cov)
    x0 = mean + torch.randn(400000, 2) @ torch.linalg.cholesky(cov).T
    x_t = x0 + 1.0 * torch.randn_like(x0)
    residual = x0 - D(x_t, 1.0)                                     # orthogonal to x_t if D is E[x|x_t]
    assert residual.mean(0).abs().max() < 0.01
    assert (residual.T @ (x_t - mean) / len(x_t)).abs().max() < 0.01
