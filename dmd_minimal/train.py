"""The training loop: a teacher, its regression pairs, then DMD's alternating updates (Algorithm 1).

Yin et al., arXiv 2311.18828, §3 and Algorithm 1. Each DMD iteration updates the generator with
the distribution-matching loss plus lambda_reg times the regression loss, then the fake score with
its denoising loss on the generator's (detached) samples. The same loop runs toy2d on a CPU and the
paper's image runs on one GPU or many (torchrun, see dist.py). Every stage writes its result into
the output folder and is reused on the next run, so rerunning the same command resumes it.

    python -m dmd_minimal.train --dataset toy2d --toy grid25 --out runs/grid25
    torchrun --nproc_per_node 7 -m dmd_minimal.train --dataset cifar10 --teacher URL_OR_PATH

Randomness: step k of process r draws from torch's generator seeded by (seed, r, k), and the regression
pairs come in an order fixed by (seed, epoch) and split across processes, so a resumed run computes
exactly what the uninterrupted run would have.
"""
import copy
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import dist
from .checkpoint import checkpoint_to_resume, redo_advice, resume, save_checkpoint
from .config import CHOICES, parse_config, regression_batch, validate
from .data import CLASS_NAMES, batch_indices
from .dmd_loss import (distribution_matching_loss, dmd_gradient, draw_sigmas, fake_score_loss, lpips_vgg,
                       regression_loss, sigma_levels)
from .generator import OneStepGenerator
from .networks import sample_shape
from .monitor import Monitor
from .pairs import PROVENANCE_KEYS, check_manifest, heun_sampler, load_pairs, make_pairs, pairs_manifest
from .report import grid_noise, report_toy, write_grids, write_log, write_samples
from .teacher import ema_update, get_teacher
from .toy2d import SAMPLERS
from .utils import DMDError, check_writable, hide_progress, index_seed

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTED = ("precision", "regression_loss")   # "" picks the machine's or the dataset's default


# ---- the regression pairs ----------------------------------------------------------------------

def get_pairs(teacher, out, manifest):
    """The regression pairs in OUT/pairs (pairs.load_pairs), made now where missing (shards split across processes)."""
    folder = out / "pairs"
    make_pairs(teacher, folder, manifest, rank=dist.rank(), world_size=dist.world_size())
    dist.barrier()   # every shard is written before anyone reads them
    return load_pairs(folder, manifest["shape"])


def pair_batches(pairs, batch_size, seed, start_step):
    """Endless regression batches dict(z, y, labels): this process's share of one fixed order (data.py).

    pairs: tensors, or load_pairs' rows, which gather y from the mapped shards and make z from its seed.
    """
    for i in batch_indices(len(pairs["z"]), batch_size, seed, start_step, dist.rank(), dist.world_size()):
        yield dict(z=pairs["z"][i], y=pairs["y"][i], labels=None if pairs["labels"] is None else pairs["labels"][i])


# ---- one DMD iteration -------------------------------------------------------------------------

def random_labels(label_dim, batch_size, device):
    """Uniform class labels [B] (None for an unconditional model)."""
    return torch.randint(label_dim, (batch_size,), device=device) if label_dim else None


def backward(loss, scaler=None):
    """loss.backward(), through fp16's GradScaler: it multiplies the loss so that small gradients survive in fp16."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def step_optimizer(net, optimizer, grad_clip, scaler=None):
    """Clip the norm of the gradient backward() left, then step; a non-finite gradient is not applied.

    Returns the norm. The scaler divides its factor back out before clipping and lowers it after an overflow.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip).item()
    if math.isfinite(norm):
        optimizer.step() if scaler is None else scaler.step(optimizer)
    if scaler is not None:
        scaler.update()
    return norm


def apply_gradients(loss, net, optimizer, grad_clip, scaler=None):
    """Backward, clip, step (step_optimizer). Returns the gradient's norm."""
    optimizer.zero_grad(set_to_none=True)
    backward(loss, scaler)
    return step_optimizer(net, optimizer, grad_clip, scaler)


def generator_step(cfg, nets, optimizer, pair_batch, levels, scaler=None):
    """One generator update: L_DM + lambda_reg L_reg (DMD Eq. 9 and Algorithm 1).

    The two losses take separate forward and backward passes whose gradients add up (the gradient of
    their sum), so only one batch's activations are held at a time: half the memory of one joint pass.
    pair_batch: this step's regression pairs dict(z, y, labels), or None for no regression loss.
    Returns the distribution-matching samples x (detached; None without distribution matching), their
    labels and the step's metrics.
    """
    generator, teacher, fake_score = nets["generator"], nets["teacher"], nets["fake_score"]
    device = levels.device
    optimizer.zero_grad(set_to_none=True)
    x = labels = None
    losses = {}
    if cfg.distribution_matching:
        B = cfg.batch_size // dist.world_size()   # this process's share
        z = torch.randn((B, *sample_shape(teacher)), device=device)
        labels = random_labels(teacher.label_dim, B, device)
        with dist.no_sync(generator, pair_batch is not None):   # DDP averages the gradients once, after the last
            x = generator(z, labels)
            sigma = draw_sigmas(levels, B, cfg.dm_min_level, cfg.dm_max_level)
            grad = dmd_gradient(x, sigma, teacher, fake_score, labels, cfg.real_score_only)
            losses["loss_dm"] = distribution_matching_loss(x, grad)
            backward(losses["loss_dm"], scaler)
        x = x.detach()
    if pair_batch is not None:
        pair_labels = None if pair_batch["labels"] is None else pair_batch["labels"].to(device)
        x_pair = generator(pair_batch["z"].to(device), pair_labels)
        losses["loss_reg"] = regression_loss(x_pair, pair_batch["y"].to(device), nets.get("lpips"), cfg.lpips_resolution)
        backward(cfg.lambda_reg * losses["loss_reg"], scaler)
    grad_norm = step_optimizer(generator, optimizer, cfg.grad_clip, scaler)
    return x, labels, dict({k: v.item() for k, v in losses.items()}, grad_norm=grad_norm)


def fake_score_step(cfg, fake_score, optimizer, x, labels, levels, scaler=None):
    """One fake-score update on detached generator samples (DMD Eq. 6, Algorithm 3). Returns its metrics."""
    loss = fake_score_loss(fake_score, x, levels, labels)
    grad_norm = apply_gradients(loss, fake_score, optimizer, cfg.grad_clip, scaler)
    return dict(loss_fake=loss.item(), grad_norm_fake=grad_norm)


# ---- the run -----------------------------------------------------------------------------------

def lr_factor(cfg):
    """Linear warm-up, then constant (the paper) or cosine decay to 0."""
    def factor(step):
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * step / cfg.dmd_steps)) if cfg.cosine_decay else 1.0
        return warm * decay
    return factor


def resolve(cfg):
    """Fill the defaults that depend on the machine, the processes or the dataset; check the choices and numbers."""
    for name, choices in CHOICES.items():   # "": the default, filled in below
        if getattr(cfg, name) not in choices and not (getattr(cfg, name) == "" and name in DEFAULTED):
            raise DMDError(f"unknown {name} {getattr(cfg, name)!r}; choose one of {', '.join(choices)}")
    if cfg.dataset == "toy2d" and cfg.toy not in SAMPLERS:
        raise DMDError(f"unknown toy distribution {cfg.toy!r}; choose one of {sorted(SAMPLERS)}")
    validate(cfg)
    if not cfg.distribution_matching and cfg.lambda_reg <= 0:
        raise DMDError("nothing to train: --no-distribution-matching needs a regression loss (--lambda-reg > 0)")
    regression = cfg.regression_loss or ("l2" if cfg.dataset == "toy2d" else "lpips")   # DMD.md §6: MSE in 2D
    if cfg.dataset == "toy2d" and regression == "lpips":
        raise DMDError("LPIPS compares images, and toy2d samples are points: use --regression-loss l2")
    _, world_size, device = dist.setup(cfg.device)
    if cfg.batch_size % world_size:
        raise DMDError(f"--batch-size {cfg.batch_size} does not split evenly across {world_size} processes")
    if cfg.regression_batch % world_size:
        raise DMDError(f"--regression-batch {cfg.regression_batch} does not split evenly across {world_size} processes")
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")   # DMD2: fp16 diverges, bf16 works
    if precision == "fp16" and device.type != "cuda":
        raise DMDError("--precision fp16 needs CUDA (for its GradScaler): use bf16 or fp32 on a CPU")
    name = f"{cfg.dataset}-{cfg.toy}" if cfg.dataset == "toy2d" else cfg.dataset + "-uncond" * cfg.unconditional
    if cfg.dataset == "folder":   # runs/folder-<the data's name>
        name = f"folder-{Path(cfg.data_dir).stem}"
    return dataclasses.replace(cfg, out=cfg.out or f"runs/{name}", device=str(device), precision=precision,
                               regression_loss=regression)


def trainable_copy(teacher):
    """A trainable copy of the teacher (generator or fake score); EDM's augmentation input stays unused."""
    net = copy.deepcopy(teacher).requires_grad_(True)
    if getattr(net.backbone, "map_augment", None) is not None:   # frozen: DDP expects a gradient for every
        net.backbone.map_augment.requires_grad_(False)           # trained parameter, and it never gets one
    return net


def train(cfg):
    """Run the stages of cfg into cfg.out; returns the generator (or, for --stage teacher / pairs, those)."""
    cfg = resolve(cfg)
    threads = torch.get_num_threads()
    if cfg.dataset == "toy2d":   # a 128-wide MLP gains nothing from a second thread, and beside another busy
        torch.set_num_threads(1)   # process two threads wait on each other: 2-3x slower (README, Run)
    try:
        return run_stages(cfg)
    finally:
        torch.set_num_threads(threads)


def run_stages(cfg):
    """train(cfg) once cfg is resolved: the teacher, its pairs and DMD, each reused from cfg.out where done."""
    out, device = Path(cfg.out), torch.device(cfg.device)   # files are written atomically, folders made as needed
    check_writable(out)   # now, not after the teacher has trained
    if device.type == "cuda":   # TF32 matmuls and convolutions for what runs in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:   # x86 CPUs handle floats below 1e-38 (tiny gradients, Adam's moments) 10-100x slower: count them as 0
        torch.set_flush_denormal(True)
    teacher = get_teacher(cfg, out).to(device).requires_grad_(False).eval()
    if cfg.stage == "teacher":
        return teacher
    cfg = dataclasses.replace(cfg, sigma_data=teacher.sigma_data)
    use_lpips = cfg.stage == "dmd" and cfg.lambda_reg > 0 and cfg.regression_loss == "lpips"
    lpips = lpips_vgg(device, cfg.lpips_pooling) if use_lpips else None   # before the pairs: a missing download fails fast
    manifest = pairs_manifest(teacher, cfg.num_pairs, cfg.seed, heun_sampler(cfg.pair_steps, cfg.sigma_min,
                              cfg.sigma_max, cfg.rho), teacher_path=cfg.teacher or str(out / "teacher.pt"))
    provenance = {key: manifest[key] for key in (*PROVENANCE_KEYS, "teacher_path")}   # what the run distils
    needs_pairs = cfg.lambda_reg > 0 or cfg.stage == "pairs"   # DMD2's runs (--lambda-reg 0) need none
    if needs_pairs:   # pairs of another teacher: redo them and the checkpoints trained on them
        check_manifest(out / "pairs", manifest, redo_advice(out, "pairs", "pairs"))
    resumed = checkpoint_to_resume(cfg, out, provenance) if cfg.stage == "dmd" else None   # checked before any work
    pairs = get_pairs(teacher, out, manifest) if needs_pairs else None   # in fp32: they do not depend on --precision
    if cfg.stage == "pairs":
        return pairs
    nets, training = build_dmd(cfg, teacher, lpips)
    state = dict(step=0, history=[], pending={}, skipped=dict(generator=0, fake_score=0))
    if resumed:
        path, saved = resumed
        state = resume(saved, cfg, nets, training)
        if dist.rank() == 0:
            print(f"resuming {path} at step {state['step']}")
    state["provenance"] = provenance   # saved in every checkpoint
    run_dmd(cfg, nets, training, pairs, state, out)
    generator = nets["generator_ema"] or dist.unwrap(nets["generator"])
    if dist.rank() == 0 and cfg.dataset == "toy2d":
        report_toy(cfg, dict(nets, generator=generator), state["history"], out, pairs)
    return generator


def build_dmd(cfg, teacher, lpips=None):
    """The networks of DMD (teacher, generator, fake score, ...) and what trains them (AdamW, schedules, scalers)."""
    device = torch.device(cfg.device)
    teacher.amp_dtype = AMP_DTYPES[cfg.precision]   # autocast around the backbones only (denoiser.py)
    generator, fake_score = OneStepGenerator(trainable_copy(teacher), cfg.sigma_max), trainable_copy(teacher)
    nets = dict(teacher=teacher, generator=dist.wrap(generator, device), fake_score=dist.wrap(fake_score, device),
                lpips=lpips, generator_ema=copy.deepcopy(generator).requires_grad_(False) if cfg.ema else None)
    optimizers = {name: torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
                  for name, net, lr in (("generator", generator, cfg.lr), ("fake_score", fake_score, cfg.fake_lr))}
    schedules = {name: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg)) for name, opt in optimizers.items()}
    scalers = {name: torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None for name in optimizers}
    return nets, dict(optimizers=optimizers, schedules=schedules, scalers=scalers)


def dmd_iteration(cfg, nets, training, pair_batch, levels, skipped):
    """Algorithm 1 once: a generator step, the fake score's step(s), then the EMA and the learning rates.

    Returns the metrics; counts in `skipped` the updates that a non-finite gradient cancelled.
    """
    optimizers, scalers = training["optimizers"], training["scalers"]
    x, labels, metrics = generator_step(cfg, nets, optimizers["generator"], pair_batch, levels, scalers["generator"])
    skipped["generator"] += not math.isfinite(metrics["grad_norm"])
    fake_steps = cfg.fake_steps_per_generator_step if cfg.distribution_matching and not cfg.real_score_only else 0
    for k in range(fake_steps):
        if k > 0:   # further fake-score steps see fresh generator samples
            with torch.no_grad():
                labels = random_labels(nets["teacher"].label_dim, len(x), x.device)
                x = nets["generator"](torch.randn_like(x), labels)
        metrics.update(fake_score_step(cfg, nets["fake_score"], optimizers["fake_score"], x, labels, levels,
                                       scalers["fake_score"]))
        skipped["fake_score"] += not math.isfinite(metrics["grad_norm_fake"])
    if cfg.ema:
        ema_update(nets["generator_ema"], dist.unwrap(nets["generator"]), cfg.ema)
    training["schedules"]["generator"].step()
    if fake_steps:
        training["schedules"]["fake_score"].step()
    return metrics


def run_dmd(cfg, nets, training, pairs, state, out):
    """DMD iterations from state['step'] to cfg.dmd_steps, with logs, grids, checkpoints and Ctrl-C."""
    device, rank, main_process = torch.device(cfg.device), dist.rank(), dist.rank() == 0
    levels = sigma_levels(cfg.num_levels, cfg.sigma_min, cfg.sigma_max, cfg.rho, device)
    pair_batch_size = regression_batch(cfg) // dist.world_size()   # this process's share
    batches = pair_batches(pairs, pair_batch_size, cfg.seed, state["step"]) if cfg.lambda_reg > 0 else None
    shown = nets["generator_ema"] or dist.unwrap(nets["generator"])   # what the grids show
    grids = main_process and cfg.dataset != "toy2d" and cfg.grid_size > 0
    if grids:
        teacher = nets["teacher"]
        noise = grid_noise(cfg.grid_size, sample_shape(teacher), teacher.label_dim, cfg.seed + 1, device)
    if main_process and state["step"] == 0:
        write_log(out, [])   # a fresh run starts a fresh log
        if grids:   # the generator before training is the teacher's one-step prediction
            write_grids(shown, noise, out / "grids" / "0000000.png", nets["teacher"], cfg.pair_steps)
    monitor = Monitor(cfg, nets["teacher"], out) if main_process and cfg.eval_every and cfg.dataset != "toy2d" else None
    if monitor and state["step"] == 0:
        monitor(shown, state)
    interrupted, in_a_row, saved = [], 0, state["step"] or None   # saved: the step of the latest checkpoint
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    bar = tqdm(range(state["step"], cfg.dmd_steps), initial=state["step"], total=cfg.dmd_steps,
               desc="dmd", mininterval=1.0, disable=hide_progress(rank))
    clock = time.perf_counter()
    try:
        for step in bar:
            torch.manual_seed(index_seed(index_seed(cfg.seed, rank), step))   # this step's randomness
            skipped_before = sum(state["skipped"].values())
            metrics = dmd_iteration(cfg, nets, training, next(batches) if batches else None, levels, state["skipped"])
            state["step"] = step + 1
            in_a_row = in_a_row + 1 if sum(state["skipped"].values()) > skipped_before else 0
            problem = divergence(metrics, nets, in_a_row, cfg.max_skipped_steps)
            if dist.any_process(problem, device):   # before the checkpoint: it never holds non-finite weights
                latest = f"{out / 'checkpoint.pt'} (step {saved}) is the last good checkpoint" if saved else \
                    "no checkpoint was written"
                raise DMDError(f"training diverged at step {state['step']}: {problem or 'on another process'}; "
                               f"{latest}; try a lower --lr / --fake-lr or more --warmup-steps in a new --out")
            for k, v in metrics.items():
                state["pending"][k] = state["pending"].get(k, 0.0) + v / cfg.log_every
            if state["step"] % cfg.log_every == 0:
                seconds, clock = time.perf_counter() - clock, time.perf_counter()
                record = log_record(cfg, state, training["schedules"]["generator"].get_last_lr()[0], seconds)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k.startswith(("loss", "images"))},
                                skipped=sum(state["skipped"].values()))   # updates a non-finite gradient cancelled
                if main_process:
                    write_log(out, state["history"])
            if grids and state["step"] % cfg.sample_every == 0:
                write_grids(shown, noise, out / "grids" / f"{state['step']:07d}.png")
            if monitor and (state["step"] % cfg.eval_every == 0 or state["step"] == cfg.dmd_steps):
                monitor(shown, state)
            stop = dist.any_process(interrupted, device)
            if main_process and (state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.dmd_steps or stop):
                save_checkpoint(out, cfg, nets, training, state)
                saved = state["step"]
            if stop:
                raise DMDError(f"interrupted: saved {out / 'checkpoint.pt'} at step {state['step']}; "
                               f"rerun the same command to resume")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
    if grids:
        write_samples(shown, nets["teacher"], out / "samples.png", seed=cfg.seed + 1,
                      class_names=CLASS_NAMES.get(cfg.dataset))
        curves = " curves.png" if monitor and monitor.scorer else ""
        print(f"wrote {out}/: checkpoint.pt log.jsonl samples.png{curves} grids/ (teacher.png: its {cfg.pair_steps}-step ODE)")


def divergence(metrics, nets, skipped_in_a_row, max_skipped):
    """Why the run must stop: a non-finite loss or weight, or too many skipped updates in a row (else None)."""
    for name, value in metrics.items():
        if name.startswith("loss") and not math.isfinite(value):
            return f"{name} is {value}"
    for name in ("generator", "fake_score"):   # one check per network: a single sync on a GPU
        if not torch.stack([p.isfinite().all() for p in nets[name].parameters()]).all():
            return f"the {name}'s weights are not finite"
    if skipped_in_a_row >= max_skipped:
        return f"{skipped_in_a_row} updates in a row had a non-finite gradient (--max-skipped-steps)"
    return None


def log_record(cfg, state, lr, seconds):
    """The metrics averaged over the last cfg.log_every steps, appended to state['history']."""
    record = dict(step=state["step"], **state["pending"], lr=lr, skipped=dict(state["skipped"]),
                  images_per_s=cfg.batch_size * cfg.log_every / seconds)
    state["history"].append(record)
    state["pending"] = {}
    return record


def main(argv=None):
    try:
        train(parse_config(argv))
    except DMDError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:   # outside the DMD loop: the finished stages are saved, the current one is redone
        sys.exit("error: interrupted; rerun the same command to continue")
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
