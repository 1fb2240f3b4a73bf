"""DMD's losses against closed forms: the gradient they put on x, and convergence with exact scores."""

import pytest
import torch

from dmd_minimal.denoiser import append_dims
from dmd_minimal.dmd_loss import (distribution_matching_loss, dmd_gradient, dmd_terms, draw_sigmas,
                                  fake_score_loss, lpips_vgg, regression_loss, sigma_levels)
from dmd_minimal.gaussian import GaussianDenoiser, GaussianMixtureDenoiser, isotropic_gaussian
from dmd_minimal.toy2d import exact_denoiser
from dmd_minimal.utils import DMDError


def test_sigma_levels():
    levels = sigma_levels()
    assert len(levels) == 1000 and (levels.diff() > 0).all()
    assert torch.isclose(levels[0], torch.tensor(0.002)) and torch.isclose(levels[-1], torch.tensor(80.0))
    assert 0.003 < levels[20] < 0.0035 and 70 < levels[980] < 74        # DMD.md §4: 2%-98%
    drawn = draw_sigmas(levels, 10000, 20, 980)
    assert drawn.min() >= levels[20] and drawn.max() <= levels[980]


@pytest.mark.parametrize("shape", [(2,), (3, 4, 4)])
@pytest.mark.parametrize("real_score_only", [False, True])
def test_autograd_gradient_equals_analytic(shape, real_score_only):
    real = GaussianMixtureDenoiser(torch.randn(5, *shape), 0.3)
    fake = GaussianMixtureDenoiser(torch.randn(3, *shape), 0.5)
    x = torch.randn(16, *shape, requires_grad=True)
    sigma = torch.rand(16) * 5 + 0.01
    torch.manual_seed(1)
    loss = distribution_matching_loss(x, dmd_gradient(x, sigma, real, fake, real_score_only=real_score_only))
    (autograd,) = torch.autograd.grad(loss, x)

    torch.manual_seed(1)                                              # the same noise n
    x_t = x.detach() + append_dims(sigma, x.ndim) * torch.randn_like(x)
    mu_real, mu_fake = real(x_t, sigma), (x.detach() if real_score_only else fake(x_t, sigma))
    w = 1 / (x.detach() - mu_real).abs().flatten(1).mean(1)
    analytic = append_dims(w, x.ndim) * (mu_fake - mu_real)
    assert torch.allclose(autograd * x.numel(), analytic, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
def test_terms_are_what_the_gradient_is_made_of(shape):
    """dmd_terms' x_t, mu_real, mu_fake and w, recomputed from the same noise, and dmd_gradient is their grad."""
    real = GaussianMixtureDenoiser(torch.randn(5, *shape), 0.3)
    fake = GaussianMixtureDenoiser(torch.randn(3, *shape), 0.5)
    x, sigma = torch.randn(8, *shape), torch.tensor([0.01, 0.1, 0.5, 1, 2, 5, 10, 80.0])
    torch.manual_seed(2)
    terms = dmd_terms(x, sigma, real, fake)
    torch.manual_seed(2)
    assert torch.equal(dmd_gradient(x, sigma, real, fake), terms["grad"])
    torch.manual_seed(2)
    x_t = x + append_dims(sigma, x.ndim) * torch.randn_like(x)
    assert torch.allclose(terms["x_t"], x_t)
    assert torch.allclose(terms["mu_real"], real(x_t, sigma)) and torch.allclose(terms["mu_fake"], fake(x_t, sigma))
    assert torch.allclose(terms["w"], 1 / (x - real(x_t, sigma)).abs().flatten(1).mean(1))
    assert torch.allclose(terms["grad"], append_dims(terms["w"], x.ndim) * (terms["mu_fake"] - terms["mu_real"]))


def test_gradient_vanishes_when_fake_equals_real():
    real = exact_denoiser("grid25")
    x = torch.randn(64, 2, requires_grad=True)
    loss = distribution_matching_loss(x, dmd_gradient(x, torch.full((64,), 0.5), real, exact_denoiser("grid25")))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() == 0


def test_gradient_points_from_fake_to_real():
    """Real N(0, I), fake N(3, I): the update x - grad moves samples towards 0."""
    real, fake = isotropic_gaussian(2, 0.0, 1.0), isotropic_gaussian(2, 3.0, 1.0)
    x = 3 + torch.randn(4096, 2)
    grad = dmd_gradient(x, torch.full((4096,), 1.0), real, fake)
    assert (grad.mean(0) > 0).all()


def test_linear_generator_converges_to_target_gaussian():
    """G(z) = A z + b with exact real and fake scores learns the target mean and covariance."""
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[2.0, 0.6], [0.6, 0.5]])
    real = GaussianDenoiser(mean, cov)
    A = torch.nn.Parameter(torch.eye(2) * 0.3)
    b = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([A, b], lr=2e-2)
    levels = sigma_levels()
    for step in range(600):
        fake = GaussianDenoiser(b.detach(), A.detach() @ A.detach().T)   # the exact fake score
        x = torch.randn(1024, 2) @ A.T + b
        sigma = draw_sigmas(levels, 1024, 20, 980)
        loss = distribution_matching_loss(x, dmd_gradient(x, sigma, real, fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(b.detach(), mean, atol=0.05)
    assert torch.allclose(A.detach() @ A.detach().T, cov, atol=0.1)


def test_fake_score_loss_of_an_exact_fake_score_is_one():
    """The fake score's loss is EDM's weighted loss, which equals 1 for the exact denoiser of the samples."""
    fake = isotropic_gaussian(2, 0.0, 1.5)
    fake.sigma_data = 1.5
    loss = fake_score_loss(fake, 1.5 * torch.randn(100000, 2), draw_sigmas(sigma_levels(), 100000))
    assert abs(loss.item() - 1) < 0.02


def test_regression_loss_is_mse():
    x, y = torch.randn(8, 2), torch.randn(8, 2)
    assert torch.isclose(regression_loss(x, y), ((x - y) ** 2).mean())


@pytest.fixture
def offline_lpips():
    """lpips_vgg with the lpips package's linear heads and a random VGG16: nothing to download."""
    pytest.importorskip("lpips")

    def build(pooling):
        torch.manual_seed(0)                                    # the same random VGG16 for both poolings
        return lpips_vgg(pooling=pooling, random_vgg=True)
    return build


def test_lpips_pools_by_average_by_default_and_by_max_on_request(offline_lpips):
    avg, max_ = offline_lpips("avg"), offline_lpips("max")
    pools = {name: [type(m).__name__ for m in net.modules() if "Pool" in type(m).__name__]
             for name, net in (("avg", avg), ("max", max_))}
    assert pools == dict(avg=["AvgPool2d"] * 4, max=["MaxPool2d"] * 4)       # VGG16 up to relu5_3
    assert all(torch.equal(a, b) for a, b in zip(avg.state_dict().values(), max_.state_dict().values()))
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert avg(x, x).abs().max() == 0 and max_(x, x).abs().max() == 0    # LPIPS(x, x) = 0
        assert (avg(x, y) - max_(x, y)).abs().min() > 1e-3 * max_(x, y).min() > 0
    assert lpips_vgg.__defaults__ == ("cpu", "avg", False)
    with pytest.raises(DMDError, match="pooling must be avg or max"):
        lpips_vgg(pooling="mean")


@pytest.mark.parametrize("fake_std, sign", [(2.0, 1), (0.5, -1)])
def test_expected_push_pulls_a_too_wide_generator_in_and_spreads_a_too_narrow_one(fake_std, sign):
    # real N(0, I), generator G(z) = fake_std z with its exact fake score: mu_fake - mu_real =
    # sigma^2 (b^2 - a^2) / ((a^2 + sigma^2)(b^2 + sigma^2)) x_t, so the mean update -grad points inward
    # (slope > 0) when the generator is wider than the data and outward when narrower, at every sigma.
    from dmd_minimal.report import expected_push
    torch.manual_seed(0)
    z = torch.randn(64, 2)
    push = expected_push(lambda z: fake_std * z, isotropic_gaussian(2), isotropic_gaussian(2, std=fake_std), z, draws=64)
    assert push["sample_std"] == pytest.approx(fake_std * z.sub(z.mean(0)).pow(2).sum(1).mean().sqrt().item())
    for level in ("small sigma", "large sigma"):
        assert sign * push[f"slope, {level}"] > 0.01   # large sigma: w = 1 / mean|x - mu_real| makes it small
