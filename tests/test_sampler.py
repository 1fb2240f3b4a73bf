"""The teacher's ODE sampler with exact denoisers: the target distribution comes out."""
import pytest
import torch

from dmd_minimal.gaussian import isotropic_gaussian
from dmd_minimal.metrics import mode_metrics
from dmd_minimal.sampler import karras_sigmas, sample_ode
from dmd_minimal.toy2d import exact_denoiser, mixture_centers


def test_karras_schedule():
    sigmas = karras_sigmas(18)
    assert len(sigmas) == 19 and sigmas[-1] == 0
    assert torch.isclose(sigmas[0], torch.tensor(80.0, dtype=torch.float64))
    assert torch.isclose(sigmas[-2], torch.tensor(0.002, dtype=torch.float64))
    assert (sigmas[:-1].diff() < 0).all()
    assert karras_sigmas(1).tolist() == [80.0, 0.0]


def test_convergence_order_against_exact_ode_solution():
    """For N(0, s^2) data the ODE is linear: x(sigma) = x(sigma_max) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2)."""
    D = isotropic_gaussian(dim=1, std=0.5)
    z = torch.ones(1, 1, dtype=torch.float64)
    exact = 80 * 0.5 / (0.5**2 + 80**2) ** 0.5
    for solver, order in (("heun", 2), ("euler", 1)):
        errors = [abs(sample_ode(D, z, n, solver=solver).item() / exact - 1) for n in (18, 36, 72)]
        for coarse, fine in zip(errors, errors[1:]):
            assert 2**order * 0.8 < coarse / fine < 2**order * 1.25


@pytest.mark.parametrize("solver,steps", [("heun", 64), ("euler", 500)])
@pytest.mark.parametrize("shape", [(2,), (3, 4, 4)])
def test_gaussian_target_std(solver, steps, shape):
    std = 0.5
    dim = torch.Size(shape).numel()
    D = isotropic_gaussian(dim=dim, std=std)
    x = sample_ode(D, torch.randn(8000 // dim, *shape), steps, solver=solver)   # 8000 numbers
    assert x.shape == (8000 // dim, *shape)
    assert abs(x.std().item() - std) < 0.02 * std + 0.01
    assert abs(x.mean().item()) < 0.02


def test_heun_on_grid25_covers_all_modes():
    x = sample_ode(exact_denoiser("grid25"), torch.randn(10000, 2), 18)
    metrics = mode_metrics(x, mixture_centers("grid25"))
    assert metrics["modes"] == 25
    assert metrics["high_quality"] > 0.95
    assert metrics["mode_kl"] < 0.02


def test_one_step_is_the_denoiser_at_sigma_max():
    D = exact_denoiser("ring8")
    z = torch.randn(100, 2)
    for solver in ("heun", "euler"):
        x = sample_ode(D, z, 1, solver=solver)
        assert torch.isfinite(x).all()
        assert torch.allclose(x, D(80 * z, 80.0), atol=1e-4)   # x + (0 - 80) (x - D) / 80 = D up to rounding


def test_trajectory_and_float64():
    D = exact_denoiser("grid25")
    z = torch.randn(50, 2, dtype=torch.float64)
    x, trajectory = sample_ode(D, z, 5, return_trajectory=True)
    assert x.dtype == torch.float64 and trajectory.shape == (6, 50, 2)
    assert torch.equal(trajectory[0], 80 * z) and torch.equal(trajectory[-1], x)


def test_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver"):
        sample_ode(exact_denoiser("grid25"), torch.randn(2, 2), 4, solver="rk4")
