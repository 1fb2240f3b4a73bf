"""Nothing made from one teacher is reused with another, damage is refused, and every error's advice, followed to
the letter, leads to the run that a fresh output folder gives, bit for bit (tiny toy2d runs)."""
import glob
import re
import shutil
from pathlib import Path

import pytest
import torch

from dmd_minimal.checkpoint import load_checkpoint
from dmd_minimal.config import TEACHER_NETWORKS, make_config
from dmd_minimal.load import load_denoiser
from dmd_minimal.networks import build_denoiser, denoiser_hash, denoiser_to_dict
from dmd_minimal.pairs import load_pairs
from dmd_minimal.teacher import get_teacher
from dmd_minimal.train import resolve, train
from dmd_minimal.utils import DMDError, atomic_save
from test_monitor import tiny_folder_run, write_folder
from test_pairs import flip_bit, tensors

# cosine decay off: a run stopped at step 2 and continued to 4 then computes what a 4-step run computes
TINY = dict(teacher_steps=20, teacher_batch=64, num_pairs=128, pair_steps=2, batch_size=64, dmd_steps=4,
            log_every=2, checkpoint_every=2, num_eval=100, cosine_decay=False)


def tiny(out, **overrides):
    return make_config("toy2d", out=str(out), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two toy2d teacher files of the same architecture with different weights."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        atomic_save(dict(denoiser=denoiser_to_dict(build_denoiser("mlp", 2.8, hidden=32, depth=2))),
                    folder / f"teacher{seed}.pt")
        paths.append(str(folder / f"teacher{seed}.pt"))
    return paths


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(**overrides): the folder of a run with these settings in a fresh --out (made once)."""
    runs = {}

    def run(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("reference")
            train(tiny(runs[key], **overrides))
        return runs[key]
    return run


def refused(cfg):
    """The one-line error train(cfg) stops with."""
    with pytest.raises(DMDError) as error:
        train(cfg)
    assert "\n" not in str(error.value)
    return str(error.value)


def follow(message):
    """Do what the advice says: delete the files it names (their globs), or return the path --resume names."""
    resume = re.search(r"--resume (\S+)", message)
    if resume and "delete" not in message.split("--resume")[1]:
        return resume.group(1)
    names = (re.search(r"pairs shard (\S+) is .*; delete it and rerun", message)
             or re.search(r"delete (.+?) to ", message))
    for pattern in re.split(r", | and ", names.group(1)):
        for path in glob.glob(pattern):
            shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
    return ""


def assert_consistent(out, ref):
    """OUT holds what the fresh run ref holds: the same teacher, pairs, checkpoints and networks."""
    a, b = load_checkpoint(Path(out) / "checkpoint.pt"), load_checkpoint(Path(ref) / "checkpoint.pt")
    assert a["step"] == b["step"] and a["provenance"]["teacher"] == b["provenance"]["teacher"]
    for net in ("generator", "fake_score"):   # the teacher: the provenance's hash, above
        for key, value in b[net]["state_dict"].items():
            assert torch.equal(a[net]["state_dict"][key], value), (net, key)
    names = [sorted(p.name for p in Path(folder).glob("checkpoint*.pt")) for folder in (out, ref)]
    assert names[0] == names[1]
    if (Path(ref) / "pairs").exists():
        pairs_a, pairs_b = load_pairs(Path(out) / "pairs"), load_pairs(Path(ref) / "pairs")
        assert pairs_a["manifest"]["teacher"] == pairs_b["manifest"]["teacher"] == b["provenance"]["teacher"]
        assert all(torch.equal(u, v) for u, v in zip(tensors(pairs_a)[:2], tensors(pairs_b)[:2]))


@pytest.mark.parametrize("lambda_reg", [1.0, 0.0], ids=["pairs", "no pairs"])
def test_another_teacher_in_an_existing_out_is_refused(lambda_reg, teachers, reference, tmp_path):
    train(tiny(tmp_path, teacher=teachers[0], lambda_reg=lambda_reg))
    message = refused(tiny(tmp_path, teacher=teachers[1], lambda_reg=lambda_reg))
    old, new = (f"teacher {denoiser_hash(load_denoiser(p))} ({p})" for p in teachers)
    if lambda_reg:   # the pairs come first: they and the checkpoints trained on them are redone
        assert message == (f"pairs folder {tmp_path / 'pairs'} holds pairs with {old}, not {new}: use another --out, "
                           f"or delete {tmp_path / 'pairs'} and {tmp_path / 'checkpoint*.pt'} to redo the pairs")
    else:
        assert message == (f"{tmp_path / 'checkpoint.pt'} was made from {old}, not {new}: use another --out, "
                           f"or delete {tmp_path / 'checkpoint*.pt'} to redo the DMD run")
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4   # nothing was touched
    follow(message)
    train(tiny(tmp_path, teacher=teachers[1], lambda_reg=lambda_reg))
    assert_consistent(tmp_path, reference(teacher=teachers[1], lambda_reg=lambda_reg))   # = another --out


def test_a_teacher_of_other_settings_is_redone_with_what_was_made_from_it(reference, tmp_path):
    train(tiny(tmp_path))
    message = refused(tiny(tmp_path, teacher_steps=21))
    assert message == (f"{tmp_path / 'teacher.pt'} was made with teacher_steps=20, not 21: use another --out, or "
                       f"delete {tmp_path / 'teacher.pt'}, {tmp_path / 'pairs'} and {tmp_path / 'checkpoint*.pt'} "
                       f"to redo the teacher")
    follow(message)
    train(tiny(tmp_path, teacher_steps=21))
    assert_consistent(tmp_path, reference(teacher_steps=21))


def test_a_teacher_of_another_image_folder_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    first, second = write_folder(tmp_path / "a.zip", 40), write_folder(tmp_path / "b.zip", 48)
    out = tmp_path / "run"
    train(tiny_folder_run(first, out, stage="teacher", eval_every=0))
    message = refused(tiny_folder_run(second, out, stage="teacher", eval_every=0))
    assert message == (f"{out / 'teacher.pt'} was made with data_dir={first!r}, not {second!r}: use another --out, "
                       f"or delete {out / 'teacher.pt'} to redo the teacher")
    follow(message)
    train(tiny_folder_run(second, out, stage="teacher", eval_every=0))
    assert torch.load(out / "teacher.pt", weights_only=True)["config"]["data_dir"] == second


def test_an_image_teacher_is_checked_by_its_network_not_by_the_flags(tmp_path, monkeypatch):
    """An empty --channel-mult means the preset's network: a run made with the flag set to it is reused, teacher
    and finished DMD run, and a teacher made before the preset changed is refused."""
    data, out = write_folder(tmp_path / "a.zip", 40), tmp_path / "run"
    train(tiny_folder_run(data, out, eval_every=0))   # channel_mult="1,2"
    made = {name: (out / name).read_bytes() for name in ("teacher.pt", "checkpoint.pt")}
    monkeypatch.setitem(TEACHER_NETWORKS, "folder", dict(TEACHER_NETWORKS["folder"], channel_mult=[1, 2]))
    train(tiny_folder_run(data, out, eval_every=0, channel_mult=""))
    assert {name: (out / name).read_bytes() for name in made} == made   # the same network: reused, nothing trained
    monkeypatch.setitem(TEACHER_NETWORKS, "folder", dict(TEACHER_NETWORKS["folder"], channel_mult=[1, 2, 2]))
    message = refused(tiny_folder_run(data, out, stage="teacher", eval_every=0, channel_mult=""))
    assert message == (f"{out / 'teacher.pt'} has a network with channel_mult=[1, 2], not the [1, 2, 2] that the "
                       f"folder preset and --model-channels/--channel-mult/--num-blocks give: use another --out, "
                       f"or delete {out / 'teacher.pt'}, {out / 'pairs'} and {out / 'checkpoint*.pt'} to redo the "
                       f"teacher")
    follow(message)
    train(tiny_folder_run(data, out, stage="teacher", eval_every=0, channel_mult=""))
    assert load_denoiser(str(out / "teacher.pt")).backbone.config["channel_mult"] == [1, 2, 2]


def test_deleting_only_teacher_pt_never_reuses_the_old_pairs(reference, tmp_path):
    train(tiny(tmp_path))
    (tmp_path / "teacher.pt").unlink()
    message = refused(tiny(tmp_path, teacher_steps=21))   # a new teacher is trained, then its pairs are refused
    assert re.fullmatch(rf"pairs folder \S+ holds pairs with teacher \w+ \({tmp_path / 'teacher.pt'}\), not teacher "
                        rf"\w+ \({tmp_path / 'teacher.pt'}\): use another --out, or delete \S+pairs and "
                        rf"\S+checkpoint\*\.pt to redo the pairs", message)
    follow(message)
    train(tiny(tmp_path, teacher_steps=21))
    assert_consistent(tmp_path, reference(teacher_steps=21))
    # the same settings retrain the same teacher (the same hash): its pairs and checkpoints are rightly reused
    (tmp_path / "teacher.pt").unlink()
    train(tiny(tmp_path, teacher_steps=21, dmd_steps=6))
    assert_consistent(tmp_path, reference(teacher_steps=21, dmd_steps=6))


@pytest.mark.parametrize("change", [dict(lambda_reg=0.5), dict(pair_steps=3)], ids=["DMD setting", "pairs setting"])
def test_a_changed_setting_is_refused_and_the_advice_redoes_what_it_changes(change, reference, tmp_path):
    train(tiny(tmp_path))
    message = refused(tiny(tmp_path, **change))
    if "pair_steps" in change:
        assert message.endswith(f"holds pairs with num_steps=2, not num_steps=3: use another --out, or delete "
                                f"{tmp_path / 'pairs'} and {tmp_path / 'checkpoint*.pt'} to redo the pairs")
    else:
        assert message == (f"{tmp_path / 'checkpoint.pt'} was made with lambda_reg=1.0, not 0.5: use another --out, "
                           f"or delete {tmp_path / 'checkpoint*.pt'} to redo the DMD run")
    follow(message)
    train(tiny(tmp_path, **change))
    assert_consistent(tmp_path, reference(**change))


@pytest.mark.parametrize("advice", ["resume", "delete"])
def test_deleting_only_checkpoint_pt_never_starts_beside_older_checkpoints(advice, reference, tmp_path):
    train(tiny(tmp_path))   # checkpoint-0000002.pt and the latest, step 4, as checkpoint.pt
    (tmp_path / "checkpoint.pt").unlink()
    message = refused(tiny(tmp_path))
    assert message == (f"{tmp_path} holds checkpoint-0000002.pt but no checkpoint.pt: continue it with --resume "
                       f"{tmp_path / 'checkpoint-0000002.pt'}, or delete {tmp_path}/checkpoint*.pt to start the "
                       f"DMD run again")
    if advice == "resume":
        train(tiny(tmp_path, resume=follow(message)))
    else:
        follow(message.split(", or ")[1])
        train(tiny(tmp_path))
    assert_consistent(tmp_path, reference())


@pytest.mark.parametrize("numbered", [True, False], ids=["numbered checkpoints left", "none left"])
def test_a_damaged_checkpoint_is_refused_and_the_advice_recovers(numbered, reference, tmp_path):
    train(tiny(tmp_path))
    if not numbered:
        (tmp_path / "checkpoint-0000002.pt").unlink()
    flip_bit(tmp_path / "checkpoint.pt")   # one bit of one tensor; the one before it is a separate file
    message = refused(tiny(tmp_path))
    assert message.startswith(f"checkpoint {tmp_path / 'checkpoint.pt'} is damaged: its contents do not match the "
                              f"checksum saved with them; ")
    if numbered:
        assert message.endswith(f"use the numbered checkpoint beside it instead: --resume "
                                f"{tmp_path / 'checkpoint-0000002.pt'}")
    else:
        assert message.endswith(f"no other checkpoint is left beside it: delete {tmp_path}/checkpoint*.pt to start "
                                f"the DMD run again")
    train(tiny(tmp_path, resume=follow(message)))
    assert_consistent(tmp_path, reference())


def test_the_message_names_every_older_checkpoint(tmp_path):
    train(tiny(tmp_path, dmd_steps=6, keep_checkpoints=3))
    flip_bit(tmp_path / "checkpoint.pt")
    assert refused(tiny(tmp_path, dmd_steps=6, resume=str(tmp_path / "checkpoint.pt"))).endswith(
        f"use the numbered checkpoint beside it instead: --resume {tmp_path / 'checkpoint-0000004.pt'} "
        f"(or an older one: checkpoint-0000002.pt)")
    assert load_checkpoint(tmp_path / "checkpoint-0000004.pt")["step"] == 4   # the one before is intact


def test_a_damaged_shard_or_teacher_is_refused_and_the_advice_recovers(reference, tmp_path):
    train(tiny(tmp_path, dmd_steps=2))
    flip_bit(tmp_path / "pairs" / "shard-00000.pt")
    message = refused(tiny(tmp_path))
    assert message.endswith("shard-00000.pt is damaged: its contents do not match the checksum saved with them; "
                            "delete it and rerun: it will be made again")
    follow(message)
    train(tiny(tmp_path))
    assert_consistent(tmp_path, reference())

    flip_bit(tmp_path / "teacher.pt")
    message = refused(tiny(tmp_path))
    assert message == (f"teacher {tmp_path / 'teacher.pt'} is damaged: its contents do not match the checksum saved "
                       f"with them; use another --out, or delete {tmp_path / 'teacher.pt'}, {tmp_path / 'pairs'} and "
                       f"{tmp_path / 'checkpoint*.pt'} to redo the teacher")
    follow(message)
    train(tiny(tmp_path))
    assert_consistent(tmp_path, reference())


def test_resume_of_another_teachers_checkpoint_is_refused(teachers, reference, tmp_path):
    train(tiny(tmp_path / "a", teacher=teachers[0]))
    message = refused(tiny(tmp_path / "b", teacher=teachers[1], resume=str(tmp_path / "a" / "checkpoint.pt")))
    assert message.endswith(f"resume a checkpoint of this run, or leave out --resume to go on in {tmp_path / 'b'}")
    train(tiny(tmp_path / "b", teacher=teachers[1]))
    assert_consistent(tmp_path / "b", reference(teacher=teachers[1]))


def test_checkpoints_record_the_teacher_and_the_sampler(tmp_path):
    train(tiny(tmp_path))
    teacher = get_teacher(resolve(tiny(tmp_path)), tmp_path)
    for path in ("checkpoint.pt", "checkpoint-0000002.pt"):
        assert load_checkpoint(tmp_path / path)["provenance"] == dict(
            teacher=denoiser_hash(teacher), num_steps=2, solver="heun", sigma_min=0.002, sigma_max=80.0, rho=7.0,
            teacher_path=str(tmp_path / "teacher.pt"))
