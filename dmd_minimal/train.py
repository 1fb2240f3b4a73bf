"""The training loop: a teacher, its regression pairs, then DMD's alternating updates (Algorithm 1).

Yin et al., arXiv 2311.18828, §3 and Algorithm 1. Each DMD iteration updates the generator with
the distribution-matching loss plus lambda_reg times the regression loss, then the fake score with
its denoising loss on the generator's (detached) samples. Every stage writes its result into the
output folder and is reused on the next run, so rerunning the same command resumes it.

    python -m dmd_minimal.train --dataset toy2d --toy grid25 --out runs/grid25
"""
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import Config, parse_config
from .dmd_loss import (distribution_matching_loss, dmd_gradient, draw_sigmas, fake_score_loss,
                       regression_loss, sigma_levels)
from .generator import OneStepGenerator
from .load import load_denoiser
from .metrics import toy_metrics
from .networks import build_denoiser, denoiser_from_dict, denoiser_to_dict
from .pairs import load_pairs, make_pairs
from .plots import loss_curves, scatter_panels
from .sampler import sample_ode
from .teacher import train_teacher
from .toy2d import SAMPLERS, sample_toy
from .utils import DMDError, atomic_save, atomic_write, load_file, rng_state, set_rng_state

# Fields that must agree with a stage's saved result for it to be reused.
TEACHER_FIELDS = ("dataset", "toy", "arch", "hidden", "depth", "sigma_data", "teacher_steps",
                  "teacher_batch", "teacher_lr", "teacher_ema", "P_mean", "P_std", "seed")
# Fields that may change when a DMD run is resumed: they do not change what is computed.
RESUMABLE_FIELDS = ("out", "device", "teacher", "dmd_steps", "log_every", "checkpoint_every", "num_eval")


def check_same(saved, cfg, fields, what, path):
    """One-line error if a saved stage was made with other settings than cfg."""
    current = dataclasses.asdict(cfg)
    for name in fields:
        if name in saved and saved[name] != current[name]:
            raise DMDError(f"{path} was made with {name}={saved[name]!r}, not {current[name]!r}: "
                           f"use another --out, or delete {path} to redo the {what}")


# ---- the teacher -------------------------------------------------------------------------------

def load_teacher(path, cfg):
    """The teacher --teacher names: a file of ours (checked to be for cfg's data), an EDM snapshot or a URL."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):   # ours: torch.save archives hold their config
        config = load_file(path, "teacher").get("config")
        if config and (config["dataset"], config["toy"]) != (cfg.dataset, cfg.toy):
            raise DMDError(f"teacher {path} was trained on {config['dataset']}/{config['toy']}, "
                           f"not {cfg.dataset}/{cfg.toy}")
    return load_denoiser(path)


def get_teacher(cfg, out):
    """The teacher from --teacher, from OUT/teacher.pt, or trained now with EDM's loss."""
    if cfg.teacher:
        return load_teacher(cfg.teacher, cfg)
    path = out / "teacher.pt"
    if path.exists():
        saved = load_file(path, "teacher", required=("config", "denoiser"))
        check_same(saved["config"], dataclasses.replace(cfg, sigma_data=saved["config"]["sigma_data"]),
                   TEACHER_FIELDS, "teacher", path)
        print(f"reusing the teacher in {path}")
        return denoiser_from_dict(saved["denoiser"])
    sigma_data = cfg.sigma_data or float(sample_toy(cfg.toy, 100_000).std())   # DMD.md §1: the data's std
    teacher = build_denoiser(cfg.arch, sigma_data, hidden=cfg.hidden, depth=cfg.depth).to(cfg.device)
    next_batch = lambda: (sample_toy(cfg.toy, cfg.teacher_batch).to(cfg.device), None)  # noqa: E731
    teacher, losses = train_teacher(teacher, next_batch, cfg.teacher_steps, cfg.teacher_lr,
                                    cfg.teacher_ema, cfg.P_mean, cfg.P_std)
    saved_cfg = dataclasses.replace(cfg, sigma_data=sigma_data)
    atomic_save(dict(config=dataclasses.asdict(saved_cfg), denoiser=denoiser_to_dict(teacher),
                     losses=losses), path)
    return teacher


def get_pairs(cfg, teacher, out, shape):
    """The regression pairs in OUT/pairs: the missing shards are made now with the teacher's Heun sampler."""
    folder = out / "pairs"
    make_pairs(teacher, folder, cfg.num_pairs, shape, cfg.seed, cfg.pair_steps, batch_size=1024)
    return load_pairs(folder, shape)


# ---- one DMD iteration -------------------------------------------------------------------------

def random_labels(label_dim, batch_size, device):
    """Uniform class labels [B] (None for an unconditional model)."""
    return torch.randint(label_dim, (batch_size,), device=device) if label_dim else None


def generator_step(cfg, nets, optimizer, pairs, levels):
    """One generator update: L_DM + lambda_reg L_reg (DMD Eq. 9 and Algorithm 1). Returns x and the losses."""
    generator, teacher, fake_score = nets["generator"], nets["teacher"], nets["fake_score"]
    B, device = cfg.batch_size, levels.device
    z = torch.randn((B,) + pairs["z"].shape[1:], device=device)
    labels = random_labels(teacher.label_dim, B, device)
    use_reg = cfg.lambda_reg > 0
    if use_reg:   # the regression batch rides in the same forward pass
        index = torch.randint(len(pairs["z"]), (B,))
        z = torch.cat([z, pairs["z"][index].to(device)])
        if labels is not None:
            labels = torch.cat([labels, pairs["labels"][index].to(device)])
    out = generator(z, labels)
    x, x_pair = out[:B], out[B:]
    labels = None if labels is None else labels[:B]
    losses = {}
    loss = torch.zeros((), device=device)
    if cfg.distribution_matching:
        sigma = draw_sigmas(levels, B, cfg.dm_min_level, cfg.dm_max_level)
        grad = dmd_gradient(x, sigma, teacher, fake_score, labels, cfg.real_score_only)
        losses["loss_dm"] = distribution_matching_loss(x, grad)
        loss = loss + losses["loss_dm"]
    if use_reg:
        losses["loss_reg"] = regression_loss(x_pair, pairs["y"][index].to(device))
        loss = loss + cfg.lambda_reg * losses["loss_reg"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip)
    optimizer.step()
    return x.detach(), labels, {k: v.item() for k, v in losses.items()}


def fake_score_step(cfg, fake_score, optimizer, x, labels, levels):
    """One fake-score update on detached generator samples (DMD Eq. 6, Algorithm 3)."""
    loss = fake_score_loss(fake_score, x, levels, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(fake_score.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.item()


# ---- the run -----------------------------------------------------------------------------------

def lr_factor(cfg):
    """Linear warm-up, then constant (the paper) or cosine decay to 0."""
    def factor(step):
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * step / cfg.dmd_steps)) if cfg.cosine_decay else 1.0
        return warm * decay
    return factor


def resolve(cfg):
    """Fill the defaults that depend on the machine or the dataset, and check the choices."""
    if cfg.toy not in SAMPLERS:
        raise DMDError(f"unknown toy distribution {cfg.toy!r}; choose one of {sorted(SAMPLERS)}")
    if not cfg.distribution_matching and cfg.lambda_reg <= 0:
        raise DMDError("nothing to train: --no-distribution-matching needs a regression loss (--lambda-reg > 0)")
    out = cfg.out or f"runs/{cfg.dataset}-{cfg.toy}"
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dataclasses.replace(cfg, out=out, device=device)


def train(cfg):
    """Run every stage of cfg into cfg.out; returns the trained generator."""
    cfg = resolve(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    teacher = get_teacher(cfg, out).to(cfg.device).requires_grad_(False).eval()
    cfg = dataclasses.replace(cfg, sigma_data=teacher.sigma_data)
    shape = (2,)
    pairs = get_pairs(cfg, teacher, out, shape)

    nets = dict(teacher=teacher,
                generator=OneStepGenerator(copy.deepcopy(teacher), cfg.sigma_max).requires_grad_(True),
                fake_score=copy.deepcopy(teacher).requires_grad_(True))
    optimizers = {name: torch.optim.AdamW(nets[name].parameters(), lr=lr, betas=(0.9, 0.999),
                                          weight_decay=cfg.weight_decay)
                  for name, lr in (("generator", cfg.lr), ("fake_score", cfg.fake_lr))}
    schedules = {name: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg)) for name, opt in optimizers.items()}
    levels = sigma_levels(cfg.num_levels, cfg.sigma_min, cfg.sigma_max, cfg.rho, cfg.device)
    state = dict(step=0, history=[], pending={})
    path = out / "checkpoint.pt"
    if path.exists():
        state = resume(path, cfg, nets, optimizers, schedules)
        print(f"resuming {path} at step {state['step']}")
    run_dmd(cfg, nets, optimizers, schedules, pairs, levels, state, path)
    report_toy(cfg, nets, state["history"], out)
    return nets["generator"]


def run_dmd(cfg, nets, optimizers, schedules, pairs, levels, state, path):
    """DMD iterations from state['step'] to cfg.dmd_steps, with logging, checkpoints and Ctrl-C."""
    uses_fake_score = cfg.distribution_matching and not cfg.real_score_only
    fake_steps = cfg.fake_steps_per_generator_step if uses_fake_score else 0
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    bar = tqdm(range(state["step"], cfg.dmd_steps), initial=state["step"], total=cfg.dmd_steps,
               desc="dmd", mininterval=1.0)
    try:
        for step in bar:
            x, labels, losses = generator_step(cfg, nets, optimizers["generator"], pairs, levels)
            for k in range(fake_steps):
                if k > 0:   # further fake-score steps see fresh generator samples
                    with torch.no_grad():
                        labels = random_labels(nets["teacher"].label_dim, cfg.batch_size, cfg.device)
                        x = nets["generator"](torch.randn_like(x), labels)
                losses["loss_fake"] = fake_score_step(cfg, nets["fake_score"], optimizers["fake_score"],
                                                      x, labels, levels)
            schedules["generator"].step()
            if fake_steps:
                schedules["fake_score"].step()
            state["step"] = step + 1
            for k, v in losses.items():
                state["pending"][k] = state["pending"].get(k, 0.0) + v / cfg.log_every
            if state["step"] % cfg.log_every == 0:
                state["history"].append(dict(step=state["step"], **state["pending"]))
                bar.set_postfix({k: f"{v:.4f}" for k, v in state["pending"].items()})
                state["pending"] = {}
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.dmd_steps or interrupted:
                save_checkpoint(path, cfg, nets, optimizers, schedules, state)
            if interrupted:
                raise DMDError(f"interrupted: saved {path} at step {state['step']}; rerun the same command to resume")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()


def save_checkpoint(path, cfg, nets, optimizers, schedules, state):
    atomic_save(dict(
        config=dataclasses.asdict(cfg), **state, rng=rng_state(),
        **{name: denoiser_to_dict(net.denoiser if name == "generator" else net) for name, net in nets.items()},
        optimizers={name: opt.state_dict() for name, opt in optimizers.items()},
        schedules={name: s.state_dict() for name, s in schedules.items()}), path)


def load_checkpoint(path):
    return load_file(path, "checkpoint", required=("config", "step", "generator", "fake_score", "teacher"))


def resume(path, cfg, nets, optimizers, schedules):
    """Restore everything save_checkpoint stored, after checking it belongs to this run."""
    saved = load_checkpoint(path)
    fields = [f.name for f in dataclasses.fields(Config) if f.name not in RESUMABLE_FIELDS]
    check_same(saved["config"], cfg, fields, "DMD run", path)
    nets["generator"].denoiser.load_state_dict(saved["generator"]["state_dict"])
    nets["fake_score"].load_state_dict(saved["fake_score"]["state_dict"])
    for name in optimizers:
        optimizers[name].load_state_dict(saved["optimizers"][name])
        schedules[name].load_state_dict(saved["schedules"][name])
    set_rng_state(saved["rng"])
    return dict(step=saved["step"], history=saved["history"], pending=saved["pending"])


# ---- the toy2d report --------------------------------------------------------------------------

@torch.no_grad()
def report_toy(cfg, nets, history, out):
    """samples.npz, metrics.json and the pictures, all from the same fixed noise z."""
    z = torch.randn(cfg.num_eval, 2, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(cfg.device)
    samples = {
        "teacher, Heun 18 steps (35 NFE)": sample_ode(nets["teacher"], z, 18).cpu(),
        "teacher, 1 Euler step": sample_ode(nets["teacher"], z, 1, solver="euler").cpu(),
        "one-step generator": nets["generator"](z).cpu(),
    }
    names = dict(zip(samples, ("teacher_heun18", "teacher_euler1", "generator")))
    nfe = dict(teacher_heun18=35, teacher_euler1=1, generator=1)
    metrics = {names[k]: dict(nfe=nfe[names[k]], **toy_metrics(x, cfg.toy, cfg.seed)) for k, x in samples.items()}
    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    atomic_write(out / "samples.npz", lambda f: np.savez(f, x=samples["one-step generator"].numpy()))
    data = sample_toy(cfg.toy, cfg.num_eval, torch.Generator().manual_seed(cfg.seed + 2))
    scatter_panels({f"data ({cfg.toy})": data, **samples}, out / "samples.png")
    curves = {k: ([h["step"] for h in history if k in h], [h[k] for h in history if k in h])
              for k in ("loss_dm", "loss_reg", "loss_fake") if any(k in h for h in history)}
    if curves:
        loss_curves(curves, out / "losses.png")
    print_metrics(metrics)
    print(f"wrote {out}/: teacher.pt pairs/ checkpoint.pt samples.npz metrics.json samples.png losses.png")


def print_metrics(metrics):
    columns = list(next(iter(metrics.values())))
    print(f"{'':16}" + "".join(f"{c:>17}" for c in columns))
    for name, row in metrics.items():
        print(f"{name:16}" + "".join(f"{row[c]:>17.4g}" for c in columns))


def main(argv=None):
    try:
        train(parse_config(argv))
    except DMDError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:   # outside the DMD loop: the finished stages are saved, the current one is redone
        sys.exit("error: interrupted; rerun the same command to continue")


if __name__ == "__main__":
    main()
