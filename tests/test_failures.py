"""A run that diverges stops with one line, and its last checkpoint has finite weights."""
import itertools
import math

import pytest
import torch
from tqdm import tqdm

import dmd_minimal.train as train_module
from dmd_minimal.checkpoint import load_checkpoint
from dmd_minimal.config import make_config
from dmd_minimal.train import build_dmd, train
from dmd_minimal.utils import DMDError


def tiny(out, **overrides):
    """toy2d with a 20-step teacher trained in OUT and a few DMD steps: seconds, not minutes."""
    return make_config("toy2d", **{**dict(out=str(out), device="cpu", hidden=32, depth=2, teacher_steps=20,
                                          teacher_batch=64, num_pairs=64, batch_size=64, dmd_steps=6, log_every=2,
                                          checkpoint_every=2, num_eval=100), **overrides})


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
    assert [p.name for p in tmp_path.glob("checkpoint-*.pt")] == ["checkpoint-0000002.pt"]


