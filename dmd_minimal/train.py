"""The training loop: a teacher, its regression pairs, then DMD's alternating updates (Algorithm 1).

Yin et al., arXiv 2311.18828, §3 and Algorithm 1. Each DMD iteration updates the generator with
the distribution-matching loss plus lambda_reg times the regression loss, then the fake score with
its denoising loss on the generator's (detached) samples. The same loop runs toy2d on a CPU and the
paper's image runs on one GPU or many (torchrun, see dist.py). Every stage writes its result into
the output folder and is reused on the next run, so rerunning the same command resumes it.

    python -m dmd_minimal.train --dataset toy2d --toy grid25 --out runs/grid25
    torchrun --nproc_per_node 7 -m dmd_minimal.train --dataset cifar10 --teacher URL_OR_PATH

Randomness: at step k every process seeds torch's generator with (seed, k), draws the noise, sigmas and
labels of the whole global batch and takes its own rows; the regression pairs come in an order fixed by
(seed, epoch), split the same way. So a resumed run computes exactly what the uninterrupted run would
have, and any number of processes and any --batch-gpu compute the same steps up to float rounding.
"""
import contextlib
import copy
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import dist
from .checkpoint import checkpoint_to_resume, redo_advice, resume, save_checkpoint
from .config import CHOICES, parse_config, regression_batch, validate
from .data import CLASS_NAMES, batch_indices
from .dmd_loss import (distribution_matching_loss, dmd_gradient, draw_sigmas, fake_score_loss, lpips_vgg,
                       regression_loss, sigma_levels)
from .dry_run import dry_run
from .generator import OneStepGenerator
from .load import cached_download
from .networks import sample_shape
from .monitor import Monitor
from .pairs import PROVENANCE_KEYS, check_manifest, heun_sampler, load_pairs, make_pairs, pairs_manifest
from .report import grid_noise, report_toy, write_grids, write_log, write_samples
from .teacher import ema_update, get_teacher, released_teacher
from .toy2d import SAMPLERS
from .utils import DMDError, check_writable, hide_progress, index_seed, run_lock

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTED = ("precision", "regression_loss")   # "" picks the machine's or the dataset's default
# Ctrl-C, and what schedulers send before they kill a job (SLURM: SIGTERM, or --signal=USR1@SECONDS; torchrun
# passes SIGTERM on to its workers): each finishes the step, saves a checkpoint and stops.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


# ---- the regression pairs ----------------------------------------------------------------------

def get_pairs(teacher, out, manifest):
    """The regression pairs in OUT/pairs (pairs.load_pairs), made now where missing (evenly across processes)."""
    folder = out / "pairs"
    make_pairs(teacher, folder, manifest, rank=dist.rank(), world_size=dist.world_size())
    dist.barrier()   # every pair is written before anyone reads them (equal shares: nobody waits long)
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


def own_rows(t):
    """This process's rows of t [world_size * B, ...], drawn alike by every process for the global batch (None: None)."""
    if t is None:
        return None
    B = len(t) // dist.world_size()
    return t[dist.rank() * B:(dist.rank() + 1) * B]


def micro_batches(size, *tensors):
    """Split tensors [B, ...] (None stays None) into rows of at most `size` (0: all): [(share, rows...)], share = rows / B.

    A step draws its randomness for the whole batch first and then splits it, so the gradient summed over
    the micro-batches, each loss weighted by its share, is the full batch's whatever --batch-gpu is.
    """
    total = len(next(t for t in tensors if t is not None))
    size = size or total
    return [(min(size, total - start) / total, *(None if t is None else t[start:start + size] for t in tensors))
            for start in range(0, total, size)]


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


def generator_step(cfg, nets, optimizer, pair_batch, levels, scaler=None):
    """One generator update: L_DM + lambda_reg L_reg (DMD Eq. 9 and Algorithm 1).

    The losses take separate forward and backward passes, in micro-batches of --batch-gpu, whose gradients
    add up to the gradient of the whole step's loss, so only one micro-batch's activations are held at a time.
    pair_batch: this step's regression pairs dict(z, y, labels), or None for no regression loss.
    Returns the distribution-matching samples x (detached; None without distribution matching), their
    labels and the step's metrics.
    """
    generator, teacher, fake_score = nets["generator"], nets["teacher"], nets["fake_score"]
    device = levels.device
    passes = []   # (loss name, its weight, share of the batch, the micro-batch's tensors)
    x = labels = None
    if cfg.distribution_matching:   # the global batch drawn whole, then this process's rows split into micro-batches
        shape = (cfg.batch_size, *sample_shape(teacher))
        z = own_rows(torch.randn(shape, device=device))
        labels = own_rows(random_labels(teacher.label_dim, cfg.batch_size, device))
        sigma = own_rows(draw_sigmas(levels, cfg.batch_size, cfg.dm_min_level, cfg.dm_max_level))
        noise = own_rows(torch.randn(shape, device=device))               # of x_t = x + sigma n
        passes += [("loss_dm", 1.0, *m) for m in micro_batches(cfg.batch_gpu, z, labels, sigma, noise)]
    if pair_batch is not None:
        pair_labels = None if pair_batch["labels"] is None else pair_batch["labels"].to(device)
        passes += [("loss_reg", cfg.lambda_reg, *m) for m in micro_batches(
            cfg.batch_gpu, pair_batch["z"].to(device), pair_batch["y"].to(device), pair_labels)]
    optimizer.zero_grad(set_to_none=True)
    losses, samples = {}, []
    for n, (name, weight, share, *batch) in enumerate(passes):
        with dist.no_sync(generator, n < len(passes) - 1):   # DDP averages the gradients once, after the last
            if name == "loss_dm":
                z_m, labels_m, sigma_m, noise_m = batch
                x_m = generator(z_m, labels_m)
                grad = dmd_gradient(x_m, sigma_m, teacher, fake_score, labels_m, cfg.real_score_only, noise_m)
                loss = distribution_matching_loss(x_m, grad)
                samples.append(x_m.detach())
            else:
                z_m, y_m, labels_m = batch
                loss = regression_loss(generator(z_m, labels_m), y_m, nets.get("lpips"), cfg.lpips_resolution)
            backward(weight * share * loss, scaler)
        losses[name] = losses.get(name, 0.0) + share * loss.item()
    if samples:
        x = torch.cat(samples)
    grad_norm = step_optimizer(generator, optimizer, cfg.grad_clip, scaler)
    return x, labels, dict(losses, grad_norm=grad_norm)


def fake_score_step(cfg, fake_score, optimizer, x, labels, levels, scaler=None):
    """One fake-score update on detached generator samples (DMD Eq. 6, Algorithm 3), in micro-batches of
    --batch-gpu. Returns its metrics."""
    every = len(x) * dist.world_size()   # over the whole grid, drawn for the global batch before it is split
    sigma = own_rows(draw_sigmas(levels, every))
    noise = own_rows(torch.randn((every, *x.shape[1:]), device=x.device))
    batches = micro_batches(cfg.batch_gpu, x, labels, sigma, noise)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for n, (share, x_m, labels_m, sigma_m, noise_m) in enumerate(batches):
        with dist.no_sync(fake_score, n < len(batches) - 1):
            loss = fake_score_loss(fake_score, x_m, sigma_m, labels_m, noise_m)
            backward(share * loss, scaler)
        total += share * loss.item()
    grad_norm = step_optimizer(fake_score, optimizer, cfg.grad_clip, scaler)
    return dict(loss_fake=total, grad_norm_fake=grad_norm)


@torch.no_grad()
def fresh_samples(generator, like, label_dim, batch_gpu):
    """New generator samples shaped like `like` [B, ...] with new labels, made in micro-batches of batch_gpu."""
    every = len(like) * dist.world_size()
    labels = own_rows(random_labels(label_dim, every, like.device))
    z = own_rows(torch.randn((every, *like.shape[1:]), device=like.device))
    return torch.cat([generator(z_m, labels_m) for _, z_m, labels_m in micro_batches(batch_gpu, z, labels)]), labels


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
            x, labels = fresh_samples(nets["generator"], x, nets["teacher"].label_dim, cfg.batch_gpu)
        metrics.update(fake_score_step(cfg, nets["fake_score"], optimizers["fake_score"], x, labels, levels,
                                       scalers["fake_score"]))
        skipped["fake_score"] += not math.isfinite(metrics["grad_norm_fake"])
    if cfg.ema:
        ema_update(nets["generator_ema"], dist.unwrap(nets["generator"]), cfg.ema)
    training["schedules"]["generator"].step()
    if fake_steps:
        training["schedules"]["fake_score"].step()
    return metrics


# ---- the run -----------------------------------------------------------------------------------

def lr_factor(cfg):
    """Linear warm-up, then constant (the paper) or cosine decay to 0."""
    def factor(step):
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * step / cfg.dmd_steps)) if cfg.cosine_decay else 1.0
        return warm * decay
    return factor


def default_precision(device):
    """bf16 on GPUs that have it (compute capability 8.0 and newer: A100, H100), fp16 with a GradScaler on older
    ones (V100, T4), fp32 elsewhere. DMD2 reports that fp16 diverges where bf16 works."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


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
    regression = cfg.regression_loss or ("l2" if cfg.dataset == "toy2d" else "lpips")   # DMD §3.3: MSE in 2D
    if cfg.dataset == "toy2d" and regression == "lpips":
        raise DMDError("LPIPS compares images, and toy2d samples are points: use --regression-loss l2")
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401   (it needs the tensorboard package)
        except ImportError:
            raise DMDError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    _, world_size, device = dist.setup(cfg.device, cfg.dist_timeout)
    if cfg.batch_size % world_size:
        raise DMDError(f"--batch-size {cfg.batch_size} does not split evenly across {world_size} processes")
    if cfg.regression_batch % world_size:
        raise DMDError(f"--regression-batch {cfg.regression_batch} does not split evenly across {world_size} processes")
    share = cfg.batch_size // world_size
    if cfg.batch_gpu and (cfg.batch_gpu > share or share % cfg.batch_gpu):
        raise DMDError(f"--batch-gpu {cfg.batch_gpu} must divide each process's share of --batch-size "
                       f"({cfg.batch_size} / {world_size} process(es) = {share}): e.g. --batch-gpu "
                       f"{max(d for d in range(1, min(cfg.batch_gpu, share) + 1) if share % d == 0)}")
    precision = cfg.precision or default_precision(device)
    if precision == "fp16" and device.type != "cuda":
        raise DMDError("--precision fp16 needs CUDA (for its GradScaler): use bf16 or fp32 on a CPU")
    if not cfg.precision and device.type == "cuda" and dist.rank() == 0:
        print(f"precision {precision}: {torch.cuda.get_device_name(device)} "
              f"{'has' if precision == 'bf16' else 'lacks'} bf16 (--precision to choose)")
    name = f"{cfg.dataset}-{cfg.toy}" if cfg.dataset == "toy2d" else cfg.dataset + "-uncond" * cfg.unconditional
    if cfg.dataset == "folder":   # runs/folder-<the data's name>
        name = f"folder-{Path(cfg.data_dir).stem}"
    out = cfg.out or f"runs/{name}"
    teacher = cfg.teacher
    if not teacher and not cfg.dry_run and cfg.stage != "teacher" and not (Path(out) / "teacher.pt").exists():
        teacher = released_teacher(cfg)   # cifar10 and imagenet64 distil EDM's released teachers by default
    return dataclasses.replace(cfg, out=out, device=str(device), precision=precision, regression_loss=regression,
                               teacher=teacher)


def trainable_copy(teacher):
    """A trainable copy of the teacher (generator or fake score); EDM's augmentation input stays unused."""
    net = copy.deepcopy(teacher).requires_grad_(True)
    if getattr(net.backbone, "map_augment", None) is not None:   # frozen: DDP expects a gradient for every
        net.backbone.map_augment.requires_grad_(False)           # trained parameter, and it never gets one
    return net


def train(cfg):
    """Run the stages of cfg into cfg.out; returns the generator (or, for --stage teacher / pairs, those).

    With cfg.dry_run, builds the networks with random weights, times two iterations and returns the plan.
    """
    cfg = resolve(cfg)
    if cfg.dry_run:
        return dry_run(cfg, build_dmd, dmd_iteration)
    threads = torch.get_num_threads()
    if cfg.dataset == "toy2d":   # a 128-wide MLP gains nothing from a second thread, and beside another busy
        torch.set_num_threads(1)   # process two threads wait on each other: 2-3x slower (README, Run)
    out = Path(cfg.out)
    new_folder = not out.exists()
    try:
        return run_stages(cfg)
    except BaseException:
        if new_folder and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:
            for p in out.iterdir():   # a run that failed before it wrote anything leaves nothing behind
                p.unlink()
            out.rmdir()
        raise
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def one_run_per_folder(out, device):
    """Process 0 holds OUT's lock (utils.run_lock) for the with-block; every process stops if another run has it."""
    with contextlib.ExitStack() as stack:
        taken = None
        if dist.rank() == 0:
            try:
                stack.enter_context(run_lock(out))
            except DMDError as e:
                taken = e
        if dist.any_process(taken, device):
            raise taken or DMDError(f"{out} is in use by another run (see process 0's error)")
        yield


def run_stages(cfg):
    """train(cfg) once cfg is resolved: the teacher, its pairs and DMD, each reused from cfg.out where done."""
    out, device = Path(cfg.out), torch.device(cfg.device)   # files are written atomically, folders made as needed
    if cfg.teacher.startswith(("http://", "https://")):   # before OUT exists: no internet leaves nothing behind
        cached_download(cfg.teacher)   # by one process; the others wait for it on a file lock, not in a collective
    check_writable(out)   # now, not after the teacher has trained
    if device.type == "cuda":   # TF32 matmuls and convolutions for what runs in fp32; the fastest convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True   # for the few fixed shapes a run has
    else:   # x86 CPUs handle floats below 1e-38 (tiny gradients, Adam's moments) 10-100x slower: count them as 0
        torch.set_flush_denormal(True)
    with one_run_per_folder(out, device):
        return distil(cfg, out, device)


def distil(cfg, out, device):
    """The stages in OUT, which this process may write: the teacher, its pairs, then DMD."""
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
        del resumed, saved   # the networks hold their own copies: free the rest of the loaded checkpoint
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


def run_dmd(cfg, nets, training, pairs, state, out):
    """DMD iterations from state['step'] to cfg.dmd_steps, with logs, grids, checkpoints and STOP_SIGNALS."""
    device, rank, main_process = torch.device(cfg.device), dist.rank(), dist.rank() == 0
    levels = sigma_levels(cfg.num_levels, cfg.sigma_min, cfg.sigma_max, cfg.rho, device)
    pair_batch_size = regression_batch(cfg) // dist.world_size()   # this process's share
    batches = pair_batches(pairs, pair_batch_size, cfg.seed, state["step"]) if cfg.lambda_reg > 0 else None
    shown = nets["generator_ema"] or dist.unwrap(nets["generator"])   # what the grids show
    grids = main_process and cfg.dataset != "toy2d" and cfg.grid_size > 0
    if grids:
        teacher = nets["teacher"]
        noise = grid_noise(cfg.grid_size, sample_shape(teacher), teacher.label_dim, cfg.seed + 1, device)
    board = tensorboard_writer(out) if main_process and cfg.tensorboard else None
    if main_process and state["step"] == 0:
        write_log(out, [])   # a fresh run starts a fresh log
        if grids:   # the generator before training is the teacher's one-step prediction
            write_grids(shown, noise, out / "grids" / "0000000.png", nets["teacher"], cfg.pair_steps)
            add_grid(board, out / "grids" / "0000000.png", 0)
    monitor = Monitor(cfg, nets["teacher"], out) if main_process and cfg.eval_every and cfg.dataset != "toy2d" else None
    if monitor and state["step"] == 0:
        monitor(shown, state)
    interrupted, in_a_row, saved = [], 0, state["step"] or None   # saved: the step of the latest checkpoint
    previous_handlers = {s: signal.signal(s, lambda signum, _: interrupted.append(signum)) for s in STOP_SIGNALS}
    bar = tqdm(range(state["step"], cfg.dmd_steps), initial=state["step"], total=cfg.dmd_steps,
               desc="dmd", mininterval=1.0, disable=hide_progress(rank))
    clock = time.perf_counter()
    try:
        for step in bar:
            # -- one iteration, with this step's own randomness (a resumed run draws what this one would)
            torch.manual_seed(index_seed(index_seed(cfg.seed, 0), step))   # alike in every process: see own_rows
            skipped_before = sum(state["skipped"].values())
            metrics = dmd_iteration(cfg, nets, training, next(batches) if batches else None, levels, state["skipped"])
            state["step"] = step + 1
            in_a_row = in_a_row + 1 if sum(state["skipped"].values()) > skipped_before else 0
            stop = dist.any_process(interrupted, device)
            log = state["step"] % cfg.log_every == 0
            checkpoint = state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.dmd_steps or stop
            # -- divergence: the weights are checked (one sync) where a log line or a checkpoint is written
            problem = divergence(metrics, nets if log or checkpoint else None, in_a_row, cfg.max_skipped_steps)
            if dist.any_process(problem, device):   # before the checkpoint: it never holds non-finite weights
                latest = f"{out / 'checkpoint.pt'} (step {saved}) is the last good checkpoint" if saved else \
                    "no checkpoint was written"
                raise DMDError(f"training diverged at step {state['step']}: {problem or 'on another process'}; "
                               f"{latest}; try a lower --lr / --fake-lr or more --warmup-steps in a new --out")
            # -- log: every process's losses, averaged
            for k, v in metrics.items():
                state["pending"][k] = state["pending"].get(k, 0.0) + v / cfg.log_every
            if log:
                state["pending"] = dist.mean_over_processes(state["pending"], device)
                seconds, clock = time.perf_counter() - clock, time.perf_counter()
                record = log_record(cfg, state, training["schedules"]["generator"].get_last_lr()[0], seconds)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k.startswith(("loss", "images"))},
                                skipped=sum(state["skipped"].values()))   # updates a non-finite gradient cancelled
                if main_process:
                    write_log(out, state["history"])
                    add_scalars(board, record)
            # -- pictures and scores (process 0)
            if grids and state["step"] % cfg.sample_every == 0:
                write_grids(shown, noise, out / "grids" / f"{state['step']:07d}.png")
                add_grid(board, out / "grids" / f"{state['step']:07d}.png", state["step"])
            if monitor and (state["step"] % cfg.eval_every == 0 or state["step"] == cfg.dmd_steps):
                monitor(shown, state)
                add_scalars(board, state["history"][-1])
            # -- checkpoint, and a stop that a signal asked for
            if main_process and checkpoint:
                save_checkpoint(out, cfg, nets, training, state)
                saved = state["step"]
            if stop:
                dist.barrier()   # every process exits after the checkpoint is written: torchrun would end process 0
                name = signal.Signals(interrupted[0]).name if interrupted else "another process's signal"
                raise DMDError(f"interrupted ({name}): saved {out / 'checkpoint.pt'} at step {state['step']}; "
                               f"rerun the same command to resume")
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        bar.close()
        if board:
            board.close()
    if grids:
        write_samples(shown, nets["teacher"], out / "samples.png", seed=cfg.seed + 1,
                      class_names=CLASS_NAMES.get(cfg.dataset))
        curves = " curves.png" if monitor and monitor.scorer else ""
        print(f"wrote {out}/: checkpoint.pt log.jsonl samples.png{curves} grids/ (teacher.png: its {cfg.pair_steps}-step ODE)")


def tensorboard_writer(out):
    """A TensorBoard writer into OUT/tensorboard (`tensorboard --logdir OUT`)."""
    from torch.utils.tensorboard import SummaryWriter   # here: only --tensorboard needs the tensorboard package
    return SummaryWriter(os.fspath(out / "tensorboard"))


def add_scalars(board, record):
    """The numbers of a log.jsonl record, as TensorBoard scalars at its step."""
    if board is not None:
        for name, value in record.items():
            if isinstance(value, (int, float)) and name != "step":
                board.add_scalar(name, value, record["step"])
        board.flush()


def add_grid(board, path, step):
    """An image grid written to path, as a TensorBoard image at step."""
    if board is not None:
        with Image.open(path) as grid:
            board.add_image("samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")


def divergence(metrics, nets, skipped_in_a_row, max_skipped):
    """Why the run must stop: a non-finite loss or weight, or too many skipped updates in a row (else None).

    nets: None to skip the weights, whose check waits for the GPU (one sync for both networks).
    """
    for name, value in metrics.items():
        if name.startswith("loss") and not math.isfinite(value):
            return f"{name} is {value}"
    if nets is not None:
        finite = torch.stack([torch.stack([p.isfinite().all() for p in nets[name].parameters()]).all()
                              for name in ("generator", "fake_score")]).tolist()
        for name, ok in zip(("generator", "fake_score"), finite):
            if not ok:
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
    # outside the DMD loop, a scheduler's signal stops the run as Ctrl-C does
    previous_handlers = {s: signal.signal(s, signal.default_int_handler) for s in STOP_SIGNALS[1:]}
    try:
        train(parse_config(argv))
    except DMDError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:   # outside the DMD loop: the finished stages are saved, the current one is redone
        sys.exit("error: interrupted; rerun the same command to continue")
    finally:
        dist.cleanup()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
