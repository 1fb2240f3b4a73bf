"""A run that goes wrong stops with one line and leaves its last good files intact: divergence, an
unwritable OUT, a full disk, a write that fails halfway."""
import errno
import io
import itertools
import math
import os

import pytest
import torch
from tqdm import tqdm

import dmd_minimal.train as train_module
from dmd_minimal.checkpoint import load_checkpoint, save_checkpoint
from dmd_minimal.config import make_config
from dmd_minimal.networks import build_denoiser
from dmd_minimal.pairs import heun_sampler, make_pairs, pairs_manifest
from dmd_minimal.train import build_dmd, resolve, train
from dmd_minimal.train import main as train_main
from dmd_minimal.utils import DMDError


def tiny(out, **overrides):
    """toy2d with a 20-step teacher trained in OUT and a few DMD steps: seconds, not minutes."""
    return make_config("toy2d", **{**dict(out=str(out), device="cpu", hidden=32, depth=2, teacher_steps=20,
                                          teacher_batch=64, num_pairs=64, batch_size=64, dmd_steps=6, log_every=2,
                                          checkpoint_every=2, num_eval=100), **overrides})


def files(folder):
    """Every file under folder (temporary ones included) with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def all_finite(checkpoint):
    return all(v.isfinite().all() for net in ("generator", "fake_score") for v in checkpoint[net]["state_dict"].values()
               if v.is_floating_point())


# ---- divergence ------------------------------------------------------------------------------

def poison_generator_gradient(monkeypatch, steps):
    """The generator's gradient is non-finite at these steps (0, 1, ...), as after an fp16 overflow."""
    def build_poisoned(*args, **kwargs):
        nets, training = build_dmd(*args, **kwargs)
        calls = itertools.count()   # lambda_reg 0: one backward pass per generator step
        first = next(nets["generator"].parameters())
        first.register_hook(lambda grad: grad * math.inf if next(calls) in steps else grad)
        return nets, training
    monkeypatch.setattr(train_module, "build_dmd", build_poisoned)


class Bar(tqdm):
    """tqdm that remembers what the progress bar showed."""
    shown = []

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        Bar.shown.append(dict(ordered_dict or {}, **kwargs))
        super().set_postfix(ordered_dict, refresh, **kwargs)


def test_skipped_updates_show_in_the_bar_and_a_run_of_them_stops_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "tqdm", Bar)
    Bar.shown.clear()
    poison_generator_gradient(monkeypatch, {0, 1, 3, 4})   # never 3 in a row
    train(tiny(tmp_path / "a", lambda_reg=0.0, max_skipped_steps=3))
    assert [shown["skipped"] for shown in Bar.shown] == [2, 3, 4]
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["skipped"] == dict(generator=4, fake_score=0)

    poison_generator_gradient(monkeypatch, {1, 2, 3, 4, 5})
    with pytest.raises(DMDError, match=r"^training diverged at step 4: 3 updates in a row had a non-finite gradient "
                                       r"\(--max-skipped-steps\); .*checkpoint.pt \(step 2\) is the last good"):
        train(tiny(tmp_path / "b", lambda_reg=0.0, max_skipped_steps=3))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2


def test_a_non_finite_loss_stops_training_at_once(tmp_path):
    with pytest.raises(DMDError, match=r"^training diverged at step 2: loss_reg is inf; .*\(step 1\) is the last good"):
        train(tiny(tmp_path, lr=1e6, checkpoint_every=1))   # the samples explode after one step
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == 1 and all_finite(saved)


def test_non_finite_weights_stop_training_and_never_reach_a_checkpoint(tmp_path, monkeypatch):
    clip, calls = torch.nn.utils.clip_grad_norm_, itertools.count()

    def clip_nan_in_the_4th_step(parameters, max_norm):   # what --grad-clip nan did: NaN weights, a finite norm
        return clip(parameters, max_norm if next(calls) < 2 * 3 else math.nan)   # 2 calls a step
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_nan_in_the_4th_step)
    with pytest.raises(DMDError, match=r"^training diverged at step 4: the generator's weights are not finite; "
                                       r".*checkpoint.pt \(step 2\) is the last good checkpoint"):
        train(tiny(tmp_path, dmd_steps=10, keep_checkpoints=5))   # step 4 would have been a checkpoint
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == 2 and all_finite(saved)
    assert not list(tmp_path.glob("checkpoint-*.pt"))   # the checkpoint of step 2 was never moved aside


# ---- file-system errors ----------------------------------------------------------------------

def test_an_out_that_cannot_be_written_is_refused_before_any_stage(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out in (a_file, a_file / "run"):
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--out", str(out), "--teacher-steps", "20"])
        assert exit_info.value.code.startswith(f"error: --out {out} is not a folder this process can write into (")
        assert "\n" not in exit_info.value.code
    # a read-only folder: root may write anywhere, so the refusal the check meets is simulated
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr("tempfile.TemporaryFile", refuse)
    with pytest.raises(DMDError, match="is not a folder this process can write into .*Permission denied"):
        train(tiny(tmp_path / "read-only"))
    assert not (tmp_path / "read-only").exists()   # no teacher was trained, and the folder made for it is gone


def fail_halfway(monkeypatch):
    """torch.save writes half of the file, then the disk is full."""
    save = torch.save

    def half_then_full(obj, f):
        data = io.BytesIO()
        save(obj, data)
        target = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f   # a path: a write in place
        target.write(data.getvalue()[:len(data.getvalue()) // 2])
        target.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", half_then_full)


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    train(tiny(tmp_path, dmd_steps=4, cosine_decay=False))   # continued to step 6: no decay over --dmd-steps
    checkpoints = {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint*.pt")}
    fail_halfway(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--out", str(tmp_path), "--hidden", "32", "--depth", "2", "--teacher-steps", "20",
                    "--teacher-batch", "64", "--num-pairs", "64", "--batch-size", "64", "--dmd-steps", "6",
                    "--log-every", "2", "--checkpoint-every", "2", "--num-eval", "100", "--no-cosine-decay"])
    message = exit_info.value.code
    assert message.startswith(f"error: cannot write {tmp_path / 'checkpoint.pt'} ([Errno 28] No space left")
    assert "\n" not in message
    assert {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint*.pt")} == checkpoints
    assert not list(tmp_path.rglob(".tmp-*"))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


def test_a_checkpoint_that_fails_halfway_leaves_the_old_one_intact(tmp_path, monkeypatch):
    cfg = resolve(tiny(tmp_path, sigma_data=1.0))
    teacher = build_denoiser("mlp", 1.0, hidden=8, depth=1).requires_grad_(False)
    nets, training = build_dmd(cfg, teacher)
    state = dict(step=3, history=[], pending={}, skipped=dict(generator=0, fake_score=0))
    save_checkpoint(tmp_path, cfg, nets, training, state)
    before = files(tmp_path)
    fail_halfway(monkeypatch)
    with pytest.raises(DMDError, match="cannot write .*checkpoint.pt .*No space left on device"):
        save_checkpoint(tmp_path, cfg, nets, training, state)   # the same step again
    assert files(tmp_path) == before


def test_a_pairs_shard_that_fails_halfway_leaves_nothing_partial(tmp_path, monkeypatch):
    teacher = build_denoiser("mlp", 1.0, hidden=8, depth=1).eval()
    manifest = pairs_manifest(teacher, 4, 0, heun_sampler(2), shard_size=2)
    make_pairs(teacher, tmp_path, manifest)
    (tmp_path / "shard-00001.pt").unlink()
    before = files(tmp_path)
    fail_halfway(monkeypatch)
    with pytest.raises(DMDError, match="cannot write .*shard-00001.pt .*No space left on device"):
        make_pairs(teacher, tmp_path, manifest)
    assert files(tmp_path) == before
