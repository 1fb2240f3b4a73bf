"""Regression pairs: pair i depends only on i, files round-trip, bad files are refused."""
import pytest
import torch

from dmd_minimal.generator import OneStepGenerator
from dmd_minimal.networks import build_denoiser
from dmd_minimal.pairs import generate_pairs, load_pairs, save_pairs
from dmd_minimal.sampler import sample_ode
from dmd_minimal.toy2d import exact_denoiser
from dmd_minimal.utils import DMDError


def test_pair_i_is_independent_of_batch_size_and_order():
    teacher = build_denoiser("mlp", 1.0, label_dim=3, hidden=32, depth=2)
    a = generate_pairs(teacher, range(20), (2,), seed=5, num_steps=4, batch_size=7)
    b = generate_pairs(teacher, range(20), (2,), seed=5, num_steps=4, batch_size=64)
    c = generate_pairs(teacher, [13, 2], (2,), seed=5, num_steps=4)
    for key in ("z", "labels"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key][[13, 2]], c[key])
    # y only up to float rounding: matrix products may sum in another order for another batch size
    assert torch.allclose(a["y"], b["y"], atol=1e-5) and torch.allclose(a["y"][[13, 2]], c["y"], atol=1e-5)
    assert a["labels"].tolist() == [i % 3 for i in range(20)]              # balanced classes
    assert not torch.equal(a["z"], generate_pairs(teacher, range(20), (2,), 6, 4)["z"])   # the seed matters


def test_pairs_are_the_teacher_ode_outputs():
    teacher = exact_denoiser("ring8")
    pairs = generate_pairs(teacher, range(50), (2,), seed=0, num_steps=18)
    assert pairs["labels"] is None
    assert torch.allclose(pairs["y"], sample_ode(teacher, pairs["z"], 18))


def test_round_trip_and_bad_files(tmp_path):
    pairs = generate_pairs(exact_denoiser("grid25"), range(10), (2,), seed=0, num_steps=2)
    save_pairs(tmp_path / "pairs.pt", pairs, seed=0, num_steps=2)
    loaded = load_pairs(tmp_path / "pairs.pt", shape=(2,))
    assert torch.equal(loaded["z"], pairs["z"]) and torch.equal(loaded["y"], pairs["y"])
    assert (loaded["seed"], loaded["num_steps"]) == (0, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.pt"]           # no temporary file left behind
    with pytest.raises(DMDError, match=r"shape \(2,\), but the teacher makes \(3, 8, 8\)"):
        load_pairs(tmp_path / "pairs.pt", shape=(3, 8, 8))
    (tmp_path / "bad.pt").write_bytes((tmp_path / "pairs.pt").read_bytes()[:100])
    with pytest.raises(DMDError, match="corrupt"):
        load_pairs(tmp_path / "bad.pt")
    with pytest.raises(DMDError, match="does not exist"):
        load_pairs(tmp_path / "missing.pt")


def test_untrained_generator_is_the_teachers_one_step_prediction():
    teacher = build_denoiser("mlp", 2.0, hidden=32, depth=2)
    z = torch.randn(16, 2)
    generator = OneStepGenerator(teacher, sigma_max=80.0)
    assert torch.allclose(generator(z), sample_ode(teacher, z, 1), atol=1e-4)
