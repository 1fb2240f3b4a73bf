"""Regression pairs: pair i depends only on i, sharded folders resume and split across ranks, bad shards are refused."""
import os

import pytest
import torch
import torch.nn as nn

from dmd_minimal.generator import OneStepGenerator
from dmd_minimal.networks import build_denoiser, denoiser_to_dict, sample_shape
from dmd_minimal.pairs import generate_pairs, load_pairs, main, make_pairs
from dmd_minimal.sampler import sample_ode
from dmd_minimal.toy2d import exact_denoiser
from dmd_minimal.utils import DMDError, atomic_save
from test_edm_networks import tiny_denoiser

SETTINGS = dict(count=20, shape=(2,), seed=5, num_steps=3, batch_size=3, shard_size=6)   # shards of 6, 6, 6, 2


def mlp_teacher():
    return build_denoiser("mlp", 1.0, label_dim=3, hidden=32, depth=2).eval()


class Interrupting(nn.Module):
    """The teacher, counting its calls and killed (KeyboardInterrupt) after `limit` of them."""

    def __init__(self, teacher, limit=float("inf")):
        super().__init__()
        self.teacher, self.label_dim, self.limit, self.calls = teacher, teacher.label_dim, limit, 0

    def forward(self, *args):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt
        return self.teacher(*args)


def shard_files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def assert_same_pairs(a, b, exact=True):
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["y"], b["y"]) if exact else torch.allclose(a["y"], b["y"], atol=1e-5)
    assert (a["seed"], a["num_steps"]) == (b["seed"], b["num_steps"])


def test_pair_i_is_independent_of_batch_size_and_order():
    teacher = mlp_teacher()
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


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    teacher = mlp_teacher()
    make_pairs(teacher, tmp_path / "whole", **SETTINGS)
    whole = load_pairs(tmp_path / "whole", shape=(2,))
    assert whole["z"].shape == whole["y"].shape == (20, 2) and whole["labels"].tolist() == [i % 3 for i in range(20)]

    # a shard is 2 batches of 5 network calls (Heun, 3 steps): killed in the middle of the third shard
    with pytest.raises(KeyboardInterrupt):
        make_pairs(Interrupting(teacher, limit=25), tmp_path / "cut", **SETTINGS)
    finished = shard_files(tmp_path / "cut")
    assert sorted(finished) == ["manifest.json", "shard-00000.pt", "shard-00001.pt"]   # no half-written shard
    with pytest.raises(DMDError, match=r"^pairs incomplete: 2 of 4 shards in .*; rerun"):
        load_pairs(tmp_path / "cut")

    counting = Interrupting(teacher)
    make_pairs(counting, tmp_path / "cut", **SETTINGS)
    assert counting.calls == 3 * 5                       # only the missing shards: 2 + 1 batches
    assert all(shard_files(tmp_path / "cut")[name] == data for name, data in finished.items())   # kept as they were
    assert_same_pairs(load_pairs(tmp_path / "cut"), whole)
    make_pairs(counting, tmp_path / "cut", **SETTINGS)
    assert counting.calls == 15                          # a finished folder costs nothing


def test_ranks_one_after_the_other_equal_one_process(tmp_path):
    teacher = mlp_teacher()
    make_pairs(teacher, tmp_path / "one", **SETTINGS)
    make_pairs(teacher, tmp_path / "two", **SETTINGS, rank=1, world_size=2)
    assert sorted(os.listdir(tmp_path / "two")) == ["manifest.json", "shard-00001.pt", "shard-00003.pt"]
    make_pairs(teacher, tmp_path / "two", **SETTINGS, rank=0, world_size=2)
    assert shard_files(tmp_path / "two") == shard_files(tmp_path / "one")


@pytest.mark.parametrize("rank, environment, shown", [(0, {}, True), (0, {"TQDM_DISABLE": "1"}, False), (1, {}, False)])
def test_progress_bar_on_process_0_unless_switched_off(rank, environment, shown, tmp_path, monkeypatch, capsys):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)   # the tutorials' saved outputs are made with TQDM_DISABLE=1
    teacher = exact_denoiser("grid25")
    make_pairs(teacher, tmp_path, 4, (2,), seed=0, num_steps=2, shard_size=2, rank=rank, world_size=2)
    assert ("pairs:" in capsys.readouterr().err) == shown


def test_pair_i_is_independent_of_batch_and_shard_size(tmp_path):
    teacher = mlp_teacher()
    make_pairs(teacher, tmp_path / "a", **SETTINGS)
    make_pairs(teacher, tmp_path / "b", **dict(SETTINGS, batch_size=20, shard_size=7))
    assert_same_pairs(load_pairs(tmp_path / "a"), load_pairs(tmp_path / "b"), exact=False)


def test_bad_requests_and_corrupt_shards_are_one_line_errors(tmp_path):
    teacher, folder = mlp_teacher(), tmp_path / "pairs"
    make_pairs(teacher, folder, **SETTINGS)
    before = shard_files(folder)
    with pytest.raises(DMDError, match=r"holds pairs with num_steps=3, not num_steps=4: use another folder or delete"):
        make_pairs(teacher, folder, **dict(SETTINGS, num_steps=4))
    with pytest.raises(DMDError, match=r"shape \(2,\), but the teacher makes \(3, 8, 8\)"):
        load_pairs(folder, shape=(3, 8, 8))
    with pytest.raises(DMDError, match="holds no pairs"):
        load_pairs(tmp_path / "missing")

    (folder / "shard-00002.pt").write_bytes(before["shard-00002.pt"][:100])          # truncated
    with pytest.raises(DMDError, match=r"pairs shard .*shard-00002.pt is corrupt") as error:
        load_pairs(folder)
    (folder / "shard-00002.pt").write_bytes(before["shard-00001.pt"])                # another shard's pairs
    with pytest.raises(DMDError, match=r"shard-00002.pt is corrupt: it should hold pairs 12\.\. of shape \(6, 2\)"):
        load_pairs(folder)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(DMDError, match=r"manifest .* is corrupt"):
        load_pairs(folder)
    assert "\n" not in str(error.value)
    after = shard_files(folder)
    assert all(after[name] == before[name] for name in before if name not in ("shard-00002.pt", "manifest.json"))


def test_cli_on_an_image_teacher_split_across_ranks(tmp_path, monkeypatch):
    teacher = tiny_denoiser("ddpmpp", resolution=8, label_dim=10)
    assert sample_shape(teacher) == (3, 8, 8)
    atomic_save(dict(denoiser=denoiser_to_dict(teacher)), tmp_path / "teacher.pt")
    args = ["--teacher", tmp_path / "teacher.pt", "--out", tmp_path / "cli", "--num", 5, "--steps", 2,
            "--batch-size", 2, "--shard-size", 2, "--device", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "2")                                  # as torchrun sets them
    monkeypatch.setenv("RANK", "0")
    main(list(map(str, args)))
    assert sorted(os.listdir(tmp_path / "cli")) == ["manifest.json", "shard-00000.pt", "shard-00002.pt"]
    monkeypatch.setenv("RANK", "1")
    main(list(map(str, args)))                                             # the second rank finishes the folder
    make_pairs(teacher, tmp_path / "direct", 5, (3, 8, 8), seed=0, num_steps=2, batch_size=2, shard_size=2)
    assert_same_pairs(load_pairs(tmp_path / "cli", shape=(3, 8, 8)), load_pairs(tmp_path / "direct"), exact=False)
    with pytest.raises(SystemExit, match=r"^error: pairs folder .* holds pairs with count=5, not count=6: use"):
        main(list(map(str, args[:5] + [6] + args[6:])))


def test_untrained_generator_is_the_teachers_one_step_prediction():
    teacher = build_denoiser("mlp", 2.0, hidden=32, depth=2)
    z = torch.randn(16, 2)
    generator = OneStepGenerator(teacher, sigma_max=80.0)
    assert torch.allclose(generator(z), sample_ode(teacher, z, 1), atol=1e-4)
