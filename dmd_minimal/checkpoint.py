"""Checkpoints of a DMD run: written atomically, the last few kept, and restored exactly.

A checkpoint holds the config (asdict), the step, the log so far, every network as a plain dict
(networks.denoiser_to_dict: no pickled code) and the optimizers, learning-rate schedules and fp16
scalers, so `train` continues a run exactly where it stopped. Only process 0 writes them.
"""
import dataclasses
import json
import os
from pathlib import Path

from . import dist
from .config import Config
from .networks import denoiser_to_dict
from .utils import DMDError, atomic_save, atomic_write, load_file

# Fields that may change when a DMD run is resumed: they do not change what is computed.
RESUMABLE_FIELDS = ("out", "stage", "device", "precision", "teacher", "resume", "data_dir", "download",
                    "dmd_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                    "grid_size", "num_eval", "max_skipped_steps")


def check_same(saved, cfg, fields, what, path):
    """One-line error if a saved stage was made with other settings than cfg."""
    current = dataclasses.asdict(cfg)
    for name in fields:
        if name in saved and saved[name] != current[name]:
            raise DMDError(f"{path} was made with {name}={saved[name]!r}, not {current[name]!r}: "
                           f"use another --out, or delete {path} to redo the {what}")


def save_checkpoint(out, cfg, nets, training, state):
    """OUT/checkpoint-STEP.pt, written atomically, then OUT/checkpoint.pt pointed at it; the last few are kept."""
    nets = {name: dist.unwrap(net) for name, net in nets.items() if net is not None and name != "lpips"}
    path = out / f"checkpoint-{state['step']:07d}.pt"
    atomic_save(dict(
        config=dataclasses.asdict(cfg), **state,
        **{name: denoiser_to_dict(getattr(net, "denoiser", net)) for name, net in nets.items()},
        **{part: {k: v.state_dict() for k, v in training[part].items() if v is not None}
           for part in ("optimizers", "schedules", "scalers")}), path)
    latest, link = out / "checkpoint.pt", out / ".checkpoint.pt.link"
    link.unlink(missing_ok=True)
    os.link(path, link)               # the same file under a second name: no copy, and
    os.replace(link, latest)          # an atomic switch of checkpoint.pt to the new step
    for old in sorted(out.glob("checkpoint-*.pt"))[:-max(cfg.keep_checkpoints, 1)]:
        old.unlink()


def load_checkpoint(path):
    return load_file(path, "checkpoint", required=("config", "step", "generator", "fake_score", "teacher"))


def resume(path, cfg, nets, training):
    """Restore everything save_checkpoint stored, after checking it belongs to this run."""
    saved = load_checkpoint(path)
    fields = [f.name for f in dataclasses.fields(Config) if f.name not in RESUMABLE_FIELDS]
    check_same(saved["config"], cfg, fields, "DMD run", path)
    dist.unwrap(nets["generator"]).denoiser.load_state_dict(saved["generator"]["state_dict"])
    dist.unwrap(nets["fake_score"]).load_state_dict(saved["fake_score"]["state_dict"])
    if nets["generator_ema"] is not None:
        nets["generator_ema"].denoiser.load_state_dict(saved["generator_ema"]["state_dict"])
    for part in ("optimizers", "schedules", "scalers"):
        for name, obj in training[part].items():
            if obj is not None and name in saved.get(part, {}):   # fp16's scalers: only if saved by an fp16 run
                obj.load_state_dict(saved[part][name])
    if dist.rank() == 0:   # the log holds what the checkpoint holds, not the steps after it
        lines = "".join(json.dumps(record) + "\n" for record in saved["history"])
        atomic_write(Path(cfg.out) / "log.jsonl", lambda f: f.write(lines.encode()))
    return dict(step=saved["step"], history=saved["history"], pending=saved["pending"],
                skipped=saved.get("skipped", dict(generator=0, fake_score=0)))
