"""Regression pairs: pair i depends only on i, sharded folders resume and split across ranks, the manifest records
the teacher and the sampler, damaged or bad shards are refused, and batches read from disk equal the pairs made."""
import copy
import itertools
import os
import struct
import zipfile

import pytest
import torch

from dmd_minimal.generator import OneStepGenerator
from dmd_minimal.networks import build_denoiser, denoiser_hash, denoiser_to_dict, sample_shape
from dmd_minimal.pairs import generate_pairs, heun_sampler, load_pairs, main, make_pairs, pairs_manifest
from dmd_minimal.sampler import sample_ode
from dmd_minimal.toy2d import exact_denoiser
from dmd_minimal.train import pair_batches
from dmd_minimal.utils import DMDError, atomic_save
from test_cluster import in_processes
from test_edm_networks import tiny_denoiser

BATCH = 3   # pairs per teacher call; shards of 6, 6, 6, 2


def mlp_teacher():
    return build_denoiser("mlp", 1.0, label_dim=3, hidden=32, depth=2).eval()


def manifest(teacher, count=20, seed=5, num_steps=3, shard_size=6, **schedule):
    return pairs_manifest(teacher, count, seed, heun_sampler(num_steps, **schedule), shard_size)


def interrupting(teacher, limit=float("inf")):
    """A copy of the teacher that counts its calls (in .calls) and is killed (KeyboardInterrupt) after `limit`."""
    teacher = copy.deepcopy(teacher)
    teacher.calls = 0

    def count(module, args):
        module.calls += 1
        if module.calls > limit:
            raise KeyboardInterrupt
    teacher.register_forward_pre_hook(count)
    return teacher


def flip_bit(path, entry=None):
    """Flip one bit in the middle of a tensor's bytes in a torch.save archive (the largest data/ entry, or `entry`)."""
    with zipfile.ZipFile(path) as archive:
        entries = [info for info in archive.infolist() if "/data/" in info.filename and info.file_size > 0]
        info = max(entries, key=lambda i: i.file_size) if entry is None else archive.getinfo(entry)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))   # the local header, then the stored bytes
        offset = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def shard_files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def tensors(pairs):
    """z, y [N, *shape] and labels [N] of load_pairs' rows (or of generate_pairs' tensors)."""
    return pairs["z"][:], pairs["y"][:], pairs["labels"]


def assert_same_pairs(a, b, exact=True):
    (z_a, y_a, labels_a), (z_b, y_b, labels_b) = tensors(a), tensors(b)
    assert torch.equal(z_a, z_b) and torch.equal(labels_a, labels_b)
    # made in other batches: equal up to rounding, relative to the samples' scale (an untrained network's reach 100s)
    assert torch.equal(y_a, y_b) if exact else (y_a - y_b).abs().max() <= 1e-4 * y_b.abs().max()


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
    make_pairs(teacher, tmp_path / "whole", manifest(teacher), BATCH)
    whole = load_pairs(tmp_path / "whole", shape=(2,))
    z, y, labels = tensors(whole)
    assert z.shape == y.shape == (20, 2) and labels.tolist() == [i % 3 for i in range(20)]

    # a shard is 2 batches of 5 network calls (Heun, 3 steps): killed in the middle of the third shard
    with pytest.raises(KeyboardInterrupt):
        make_pairs(interrupting(teacher, limit=25), tmp_path / "cut", manifest(teacher), BATCH)
    finished = shard_files(tmp_path / "cut")
    assert sorted(finished) == ["manifest.json", "shard-00000.pt", "shard-00001.pt"]   # no half-written shard
    with pytest.raises(DMDError, match=r"^pairs incomplete: 12 of 20 pairs in .*; rerun"):
        load_pairs(tmp_path / "cut")

    counting = interrupting(teacher)
    make_pairs(counting, tmp_path / "cut", manifest(teacher), BATCH)
    assert counting.calls == 3 * 5                       # only the missing shards: 2 + 1 batches
    assert all(shard_files(tmp_path / "cut")[name] == data for name, data in finished.items())   # kept as they were
    assert_same_pairs(load_pairs(tmp_path / "cut"), whole)
    make_pairs(counting, tmp_path / "cut", manifest(teacher), BATCH)
    assert counting.calls == 15                          # a finished folder costs nothing


@pytest.mark.parametrize("image", [False, True], ids=["[B, 2]", "[B, 3, 8, 8]"])
def test_batches_from_disk_equal_the_pairs_in_memory(image, tmp_path):
    """The regression batches of training: from the mapped shards and regenerated noise, exactly the z, y and
    labels that every shard's tensors concatenated in memory gave (the pairs as load_pairs returned them before)."""
    teacher = tiny_denoiser("ddpmpp", resolution=8, label_dim=10) if image else mlp_teacher()
    make_pairs(teacher, tmp_path, manifest(teacher), BATCH)
    in_memory = generate_pairs(teacher, range(20), sample_shape(teacher), seed=5, num_steps=3, batch_size=BATCH)
    for start_step in (0, 5):   # 3 batches of 6 per epoch: both runs cross epochs, the second as if resumed
        from_disk = pair_batches(load_pairs(tmp_path, sample_shape(teacher)), 6, seed=1, start_step=start_step)
        expected = pair_batches(in_memory, 6, seed=1, start_step=start_step)
        for a, b in itertools.islice(zip(from_disk, expected), 7):
            for key in ("z", "y", "labels"):
                assert torch.equal(a[key], b[key]), key
    assert sorted(torch.load(tmp_path / "shard-00000.pt", weights_only=True)) == ["checksum", "start", "y"]


def test_manifest_records_the_teacher_and_the_sampler(tmp_path):
    teacher, other = mlp_teacher(), mlp_teacher()
    make_pairs(teacher, tmp_path, manifest(teacher), BATCH)
    stored = load_pairs(tmp_path)["manifest"]
    assert stored["teacher"] == denoiser_hash(teacher) != denoiser_hash(other)
    assert {key: stored[key] for key in ("num_steps", "solver", "sigma_min", "sigma_max", "rho")} == \
        dict(num_steps=3, solver="heun", sigma_min=0.002, sigma_max=80.0, rho=7.0)
    with pytest.raises(DMDError, match=rf"holds pairs with teacher {stored['teacher']} \(path unknown\), not teacher "
                                       rf"{denoiser_hash(other)} \(path unknown\): use another --out, or delete"):
        make_pairs(other, tmp_path, manifest(other), BATCH)
    with pytest.raises(DMDError, match=r"holds pairs with sigma_max=80.0, not sigma_max=40.0"):
        make_pairs(teacher, tmp_path, manifest(teacher, sigma_max=40.0), BATCH)
    pairs = generate_pairs(teacher, range(4), (2,), seed=5, num_steps=3, sigma_max=40.0)   # the schedule is used
    assert torch.equal(pairs["y"], sample_ode(teacher, pairs["z"], 3, pairs["labels"], sigma_max=40.0))


def test_a_damaged_shard_is_refused_and_made_again_once_deleted(tmp_path):
    teacher = mlp_teacher()
    make_pairs(teacher, tmp_path, manifest(teacher), BATCH)
    before = tensors(load_pairs(tmp_path))
    flip_bit(tmp_path / "shard-00002.pt")
    with pytest.raises(DMDError) as error:
        load_pairs(tmp_path)
    assert str(error.value) == (f"pairs shard {tmp_path / 'shard-00002.pt'} is damaged: its contents do not match the "
                                f"checksum saved with them; delete it and rerun: it will be made again")
    (tmp_path / "shard-00002.pt").unlink()   # as the error says
    make_pairs(teacher, tmp_path, manifest(teacher), BATCH)
    assert all(torch.equal(a, b) for a, b in zip(tensors(load_pairs(tmp_path)), before))


@pytest.mark.parametrize("rank, environment, shown", [(0, {}, True), (0, {"TQDM_DISABLE": "1"}, False), (1, {}, False)])
def test_progress_bar_on_process_0_unless_switched_off(rank, environment, shown, tmp_path, monkeypatch, capsys):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)   # the tutorials' saved outputs are made with TQDM_DISABLE=1
    teacher = mlp_teacher()
    make_pairs(teacher, tmp_path, manifest(teacher, count=4, num_steps=2, shard_size=2), rank=rank, world_size=2)
    assert ("pairs:" in capsys.readouterr().err) == shown


def test_pair_i_is_independent_of_batch_and_shard_size(tmp_path):
    teacher = mlp_teacher()
    make_pairs(teacher, tmp_path / "a", manifest(teacher), BATCH)
    make_pairs(teacher, tmp_path / "b", manifest(teacher, shard_size=7), batch_size=20)
    assert_same_pairs(load_pairs(tmp_path / "a"), load_pairs(tmp_path / "b"), exact=False)


def test_bad_requests_and_corrupt_shards_are_one_line_errors(tmp_path):
    teacher, folder = mlp_teacher(), tmp_path / "pairs"
    make_pairs(teacher, folder, manifest(teacher), BATCH)
    before = shard_files(folder)
    with pytest.raises(DMDError, match=r"holds pairs with num_steps=3, not num_steps=4: use another --out, or delete"):
        make_pairs(teacher, folder, manifest(teacher, num_steps=4), BATCH)
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


@pytest.mark.parametrize("damage", ["manifest", "shard"])
def test_following_the_advice_for_a_corrupt_folder_or_shard_makes_the_same_pairs(damage, tmp_path):
    teacher, folder = mlp_teacher(), tmp_path / "pairs"
    make_pairs(teacher, folder, manifest(teacher), BATCH)
    before = shard_files(folder)
    if damage == "manifest":
        (folder / "manifest.json").write_text('{"count": 20}')   # e.g. a manifest of an older version
        with pytest.raises(DMDError, match=rf"lacks shape, .*\): delete {folder} and make the pairs again$"):
            load_pairs(folder)
        for name in before:
            (folder / name).unlink()
        folder.rmdir()
    else:
        (folder / "shard-00002.pt").write_bytes(before["shard-00002.pt"][:100])
        with pytest.raises(DMDError, match=r"is corrupt .*; delete it and rerun: it will be made again$"):
            load_pairs(folder)
        (folder / "shard-00002.pt").unlink()
    make_pairs(teacher, folder, manifest(teacher), BATCH)
    assert shard_files(folder) == before


def test_cli_on_an_image_teacher_split_across_ranks(tmp_path, monkeypatch):
    teacher = tiny_denoiser("ddpmpp", resolution=8, label_dim=10)
    assert sample_shape(teacher) == (3, 8, 8)
    atomic_save(dict(denoiser=denoiser_to_dict(teacher)), tmp_path / "teacher.pt")
    args = ["--teacher", tmp_path / "teacher.pt", "--out", tmp_path / "cli", "--num", 5, "--steps", 2,
            "--batch-size", 2, "--shard-size", 2, "--device", "cpu"]
    in_processes(main, list(map(str, args)), folder=tmp_path)   # torchrun's two processes: pairs 0..2 and 3..4
    assert sorted(os.listdir(tmp_path / "cli")) == ["manifest.json", "shard-00000.pt", "shard-00001-2-3.pt",
                                                    "shard-00001-3-4.pt", "shard-00002.pt"]
    make_pairs(teacher, tmp_path / "direct", manifest(teacher, count=5, seed=0, num_steps=2, shard_size=2), 2)
    assert_same_pairs(load_pairs(tmp_path / "cli", shape=(3, 8, 8)), load_pairs(tmp_path / "direct"), exact=False)
    assert load_pairs(tmp_path / "cli")["manifest"]["teacher_path"] == str(tmp_path / "teacher.pt")
    with pytest.raises(SystemExit, match=r"^error: pairs folder .* holds pairs with count=5, not count=6: use"):
        main(list(map(str, args[:5] + [6] + args[6:])))


def test_untrained_generator_is_the_teachers_one_step_prediction():
    teacher = build_denoiser("mlp", 2.0, hidden=32, depth=2)
    z = torch.randn(16, 2)
    generator = OneStepGenerator(teacher, sigma_max=80.0)
    assert torch.allclose(generator(z), sample_ode(teacher, z, 1), atol=1e-4)
