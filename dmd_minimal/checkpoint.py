"""Checkpoints of a DMD run: written atomically with a checksum, the last few kept, and restored exactly.

A checkpoint holds the config (asdict), the step, the log so far, what the run distils (its provenance:
the teacher's hash and path and the pairs' sampler, pairs.PROVENANCE_KEYS), the trained networks as plain
dicts (networks.denoiser_to_dict: no pickled code) and the optimizers, learning-rate schedules and fp16
scalers, so `train` continues a run exactly where it stopped. The frozen teacher is not stored: the
provenance names it, and resuming or sampling finds it through the run's teacher. Only process 0 writes
them: the latest as OUT/checkpoint.pt, and the one it replaces is renamed OUT/checkpoint-STEP.pt (a
rename, not a copy: an ImageNet checkpoint is gigabytes), so a damaged latest leaves an older one intact.
"""
import dataclasses
import os
from pathlib import Path

import torch

from . import dist
from .config import Config
from .networks import denoiser_to_dict
from .pairs import PROVENANCE_KEYS, describe
from .report import write_log
from .utils import DMDError, atomic_save, load_file

# Fields that may change when a DMD run is resumed: they do not change what is computed (the teacher's
# path and network flags may change; its identity is checked through the provenance). dmd_steps may change
# only without --cosine-decay, whose schedule it sets (checkpoint_to_resume).
RESUMABLE_FIELDS = ("out", "stage", "device", "precision", "dist_timeout", "dry_run", "tensorboard",
                    "teacher", "resume", "data_dir", "download", "batch_gpu",
                    "model_channels", "channel_mult", "num_blocks",
                    "dmd_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                    "grid_size", "num_eval", "max_skipped_steps", "eval_every", "eval_num")
MADE_FROM = ("teacher.pt", "pairs", "checkpoint*.pt")   # what OUT holds, each made from the ones before it


def redo_advice(out, first, what):
    """'use another --out, or delete OUT/pairs and OUT/checkpoint*.pt to redo the pairs': `first` and what
    OUT made from it, so that nothing made from the old one is reused."""
    out = Path(out)
    found = [str(out / name) for name in MADE_FROM[MADE_FROM.index(first):] if any(out.glob(name))]
    found = found or [str(out / first)]
    files = f"{', '.join(found[:-1])} and {found[-1]}" if len(found) > 1 else found[0]
    return f"use another --out, or delete {files} to redo the {what}"


def check_same(saved, cfg, fields, path, fix):
    """One-line error, ending in `fix`, if a saved stage was made with other settings than cfg."""
    current = dataclasses.asdict(cfg)
    for name in fields:
        if name in saved and saved[name] != current[name]:
            raise DMDError(f"{path} was made with {name}={saved[name]!r}, not {current[name]!r}: {fix}")


def numbered_checkpoints(folder):
    """The checkpoint-STEP.pt files in folder, newest first."""
    return sorted(Path(folder).glob("checkpoint-*.pt"), reverse=True)


def stored_step(path):
    """The step of the checkpoint at path (read from its mapped file, not loaded), or None if there is none
    or it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:   # missing or damaged: nothing to keep
        return None


def save_checkpoint(out, cfg, nets, training, state):
    """OUT/checkpoint.pt, atomically; the checkpoint it replaces is renamed checkpoint-STEP.pt, and the
    cfg.keep_checkpoints - 1 newest of those are kept."""
    nets = {name: dist.unwrap(net) for name, net in nets.items()
            if net is not None and name not in ("teacher", "lpips")}
    latest = out / "checkpoint.pt"
    previous = stored_step(latest)

    def keep_previous():   # after the new file is written, before it takes the name
        if previous is not None and previous != state["step"]:
            os.replace(latest, out / f"checkpoint-{previous:07d}.pt")
    atomic_save(dict(
        config=dataclasses.asdict(cfg), **state,
        **{name: denoiser_to_dict(getattr(net, "denoiser", net)) for name, net in nets.items()},
        **{part: {k: v.state_dict() for k, v in training[part].items() if v is not None}
           for part in ("optimizers", "schedules", "scalers")}), latest, before_replace=keep_previous)
    for old in numbered_checkpoints(out)[max(cfg.keep_checkpoints - 1, 0):]:
        old.unlink()


def recovery(path, flag="--resume"):
    """What to do when the checkpoint at path is damaged: take a numbered checkpoint beside it (with `flag`)."""
    path = Path(path)
    others = [p for p in numbered_checkpoints(path.parent) if p.name != path.name]
    if not others:
        return f"no other checkpoint is left beside it: delete {path.parent}/checkpoint*.pt to start the DMD run again"
    older = f" (or an older one: {', '.join(p.name for p in others[1:])})" if others[1:] else ""
    return f"use the numbered checkpoint beside it instead: {flag} {others[0]}{older}"


def load_checkpoint(path):
    return load_file(path, "checkpoint", required=("config", "step", "provenance", "generator", "fake_score"),
                     fix=recovery(path))


def checkpoint_to_resume(cfg, out, provenance):
    """(path, saved) of the checkpoint this run continues (--resume, else OUT/checkpoint.pt), or None to start.

    Refuses a checkpoint made from another teacher or sampler (provenance) or with other settings.
    """
    if not cfg.resume and not (out / "checkpoint.pt").exists():
        numbered = numbered_checkpoints(out)
        if numbered:   # checkpoint.pt deleted by hand: never start afresh beside an older run's checkpoints
            raise DMDError(f"{out} holds {numbered[0].name} but no checkpoint.pt: continue it with --resume "
                           f"{numbered[0]}, or delete {out}/checkpoint*.pt to start the DMD run again")
        return None
    path = Path(cfg.resume) if cfg.resume else out / "checkpoint.pt"
    saved = load_checkpoint(path)
    fix = (f"resume a checkpoint of this run, or leave out --resume to go on in {out}" if cfg.resume
           else redo_advice(out, "checkpoint*.pt", "DMD run"))
    differ = [key for key in PROVENANCE_KEYS if saved["provenance"].get(key) != provenance[key]]
    if differ:
        raise DMDError(f"{path} was made from {describe(saved['provenance'], differ)}, "
                       f"not {describe(provenance, differ)}: {fix}")
    fields = [f.name for f in dataclasses.fields(Config) if f.name not in RESUMABLE_FIELDS]
    check_same(saved["config"], cfg, fields, path, fix)
    steps = saved["config"]["dmd_steps"]
    if cfg.cosine_decay and steps != cfg.dmd_steps:   # the decay's length: the steps taken so far followed it
        raise DMDError(f"{path} was made with dmd_steps={steps}, not {cfg.dmd_steps}, and --cosine-decay decays the "
                       f"learning rates to 0 over --dmd-steps: resume with --dmd-steps {steps}, or {fix}")
    return path, saved


def resume(saved, cfg, nets, training):
    """Restore everything save_checkpoint stored (in `saved`, which checkpoint_to_resume found and checked)."""
    dist.unwrap(nets["generator"]).denoiser.load_state_dict(saved["generator"]["state_dict"])
    dist.unwrap(nets["fake_score"]).load_state_dict(saved["fake_score"]["state_dict"])
    if nets["generator_ema"] is not None:
        nets["generator_ema"].denoiser.load_state_dict(saved["generator_ema"]["state_dict"])
    for part in ("optimizers", "schedules", "scalers"):
        for name, obj in training[part].items():
            if obj is not None and name in saved.get(part, {}):   # fp16's scalers: only if saved by an fp16 run
                obj.load_state_dict(saved[part][name])
    if dist.rank() == 0:   # the log holds what the checkpoint holds, not the steps after it
        write_log(Path(cfg.out), saved["history"])
    return dict(step=saved["step"], history=saved["history"], pending=saved["pending"],
                skipped=saved.get("skipped", dict(generator=0, fake_score=0)))
