"""Toy data and the mode / distance metrics."""
import math

import pytest
import torch

from dmd_minimal.metrics import energy_distance, mode_metrics, toy_metrics
from dmd_minimal.pairs import generate_pairs, heun_sampler
from dmd_minimal.report import copying, copying_distance
from dmd_minimal.sampler import sample_ode
from dmd_minimal.toy2d import SAMPLERS, exact_denoiser, mixture_centers, sample_toy


@pytest.mark.parametrize("toy", sorted(SAMPLERS))
def test_toy_samples_are_reproducible_and_match_themselves(toy):
    a = sample_toy(toy, 3000, torch.Generator().manual_seed(1))
    assert a.shape == (3000, 2) and torch.isfinite(a).all()
    assert torch.equal(a, sample_toy(toy, 3000, torch.Generator().manual_seed(1)))
    assert toy_metrics(a, toy)["energy_distance"] < 0.01


def test_mixture_data_is_perfect():
    m = mode_metrics(sample_toy("grid25", 20000), mixture_centers("grid25"))
    assert m["modes"] == 25 and m["high_quality"] > 0.98 and m["mode_kl"] < 0.01


def test_collapse_is_detected():
    x = torch.tensor([[2.0, 2.0]]) + 0.1 * torch.randn(5000, 2)     # all on one mode
    m = mode_metrics(x, mixture_centers("grid25"))
    assert m["modes"] == 1 and m["high_quality"] > 0.98   # 1 - exp(-4.5) within 3 std in 2D
    assert abs(m["mode_kl"] - math.log(25)) < 1e-4


def test_half_the_modes():
    centers = mixture_centers("ring8")
    x = centers[torch.randint(0, 4, (8000,))] + 0.1 * torch.randn(8000, 2)
    m = mode_metrics(x, centers)
    assert m["modes"] == 4 and abs(m["mode_kl"] - math.log(2)) < 0.01


def test_a_mode_is_covered_from_20_percent_of_its_expected_share():
    centers = mixture_centers("ring8")
    counts = torch.tensor([1000] * 6 + [300, 80])   # the last two: 38% and 10% of the expected 6380 / 8
    m = mode_metrics(centers.repeat_interleave(counts, dim=0), centers)
    assert m["high_quality"] == 1 and m["modes"] == 7


def test_energy_distance_separates():
    x, y = torch.randn(3000, 2), torch.randn(3000, 2)
    assert abs(energy_distance(x, y)) < 0.01
    assert energy_distance(x, y + 1.0) > 0.3


def test_copying_distance_is_zero_for_the_teachers_ode_map():
    """The copying distance (report.copying) measures the noise -> sample map, not only the distribution:
    0 for the teacher's own ODE, on fresh noise and on the pairs; large for its one-step prediction and for
    z -> ODE(-z), which makes the same (symmetric) grid25 distribution from other noise."""
    teacher = exact_denoiser("grid25")
    sampler = heun_sampler(6)
    pairs = generate_pairs(teacher, range(50), (2,), seed=3, num_steps=6)   # the same Heun ODE as `sampler`
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    ode = lambda z: sample_ode(teacher, z, **sampler)   # noqa: E731
    exact = copying(ode, teacher, z, sampler, pairs)
    assert exact["copy_heldout"] < 1e-5 and exact["copy_pairs"] < 1e-5
    for other in (lambda z: sample_ode(teacher, z, 1), lambda z: ode(-z)):
        far = copying(other, teacher, z, sampler, pairs)
        assert far["copy_heldout"] > 1 and far["copy_pairs"] > 1   # grid points lie 2 apart
    assert copying(ode, teacher, z, sampler)["copy_pairs"] is None   # a run without pairs
    assert copying_distance(torch.zeros(4, 2), torch.tensor([[3.0, 4.0]] * 4)) == pytest.approx(5.0)
