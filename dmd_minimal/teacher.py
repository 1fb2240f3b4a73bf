"""The teacher: a released one loaded (EDM's snapshots), or one trained here with EDM's loss (EDM §5).

A teacher trained here is saved with its config as OUT/teacher.pt and reused while the fields that
shaped it (TEACHER_FIELDS) agree. The weights kept are an exponential moving average of the trained
ones, as in EDM.
"""
import copy
import dataclasses
import math
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

from . import dist
from .checkpoint import check_same, redo_advice
from .config import LABEL_DIMS, TEACHER_NETWORKS
from .data import infinite_loader, load_dataset
from .denoiser import edm_loss
from .load import EDM_TEACHERS, load_denoiser
from .networks import build_denoiser, denoiser_from_dict, denoiser_to_dict, sample_shape
from .toy2d import sample_toy
from .utils import DMDError, atomic_save, load_file

# Fields that must agree with a saved teacher for it to be reused.
TEACHER_FIELDS = ("dataset", "toy", "arch", "hidden", "depth", "sigma_data", "teacher_steps", "teacher_batch",
                  "teacher_lr", "teacher_ema", "P_mean", "P_std", "seed", "resolution", "unconditional",
                  "model_channels")
PROCEDURAL = ("toy2d", "shapes")   # data made by code: a missing teacher is trained without asking


@torch.no_grad()
def ema_update(ema, net, decay):
    """ema <- decay ema + (1 - decay) net, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def train_teacher(denoiser, next_batch, steps, lr, ema_decay=0.999, P_mean=-1.2, P_std=1.2):
    """Train `denoiser` on batches (x, class_labels) from next_batch(); returns the EMA copy and the loss curve."""
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    bar = tqdm(range(steps), desc="teacher", mininterval=1.0)
    for step in bar:
        x, class_labels = next_batch()
        loss = edm_loss(denoiser, x, class_labels, P_mean, P_std)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema_update(ema, denoiser, ema_decay)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    return ema, losses


def data_spec(cfg):
    """(shape of a sample, number of classes) of cfg's data: what the teacher must fit."""
    if cfg.dataset == "toy2d":
        return (2,), 0
    return (3, cfg.resolution, cfg.resolution), 0 if cfg.unconditional else LABEL_DIMS[cfg.dataset]


def data_name(dataset, toy, unconditional=False):
    """How messages name the data: toy2d/grid25, cifar10, cifar10 --unconditional, ..."""
    return f"toy2d/{toy}" if dataset == "toy2d" else dataset + " --unconditional" * unconditional


def check_teacher(teacher, cfg, name):
    """One-line error unless the teacher makes samples of cfg's shape with cfg's classes."""
    shape, label_dim = data_spec(cfg)
    if tuple(sample_shape(teacher)) != shape or teacher.label_dim != label_dim:
        raise DMDError(f"teacher {name} makes samples {tuple(sample_shape(teacher))} with {teacher.label_dim} "
                       f"classes, but {data_name(cfg.dataset, cfg.toy, cfg.unconditional)} has {shape} with "
                       f"{label_dim}: pass a teacher for this data")


def load_teacher(path, cfg):
    """The teacher --teacher names: a file of ours (checked to be for cfg's data), an EDM snapshot or a URL."""
    if Path(path).is_file() and zipfile.is_zipfile(path):   # ours: torch.save archives hold their config
        config = load_file(path, "teacher").get("config")
        trained_on = config and data_name(config["dataset"], config["toy"], config.get("unconditional", False))
        if trained_on and trained_on != data_name(cfg.dataset, cfg.toy, cfg.unconditional):
            raise DMDError(f"teacher {path} was trained on {trained_on}, "
                           f"not {data_name(cfg.dataset, cfg.toy, cfg.unconditional)}")
    return load_denoiser(path)


def train_new_teacher(cfg, path):
    """Train a teacher for cfg's data with EDM's loss (train_teacher) and save it to path."""
    shape, label_dim = data_spec(cfg)
    if cfg.dataset == "toy2d":
        sigma_data = cfg.sigma_data or float(sample_toy(cfg.toy, 100_000).std())   # DMD.md §1: the data's std
        teacher = build_denoiser(cfg.arch, sigma_data, hidden=cfg.hidden, depth=cfg.depth)
        next_batch = lambda: (sample_toy(cfg.toy, cfg.teacher_batch).to(cfg.device), None)  # noqa: E731
    else:
        dataset = load_dataset(cfg.dataset, cfg.data_dir or None, cfg.download, cfg.resolution)
        if dataset.channels != shape[0]:
            raise DMDError(f"{cfg.data_dir} holds {dataset.channels}-channel images, not {shape[0]}")
        if label_dim and not 0 < dataset.num_classes <= label_dim:
            raise DMDError(f"{cfg.data_dir} has {dataset.num_classes} classes, not up to {label_dim}: "
                           f"--unconditional ignores the labels")
        network = dict(TEACHER_NETWORKS[cfg.dataset], img_resolution=cfg.resolution)
        network["model_channels"] = cfg.model_channels or network["model_channels"]
        teacher = build_denoiser(sigma_data=cfg.sigma_data, label_dim=label_dim, **network)
        batches = infinite_loader(dataset, cfg.teacher_batch, cfg.seed)

        def next_batch():
            x, labels = next(batches)
            return x.to(cfg.device), labels.to(cfg.device) if label_dim else None
    teacher.to(cfg.device).amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else None   # fp16 needs a GradScaler
    teacher, losses = train_teacher(teacher, next_batch, cfg.teacher_steps, cfg.teacher_lr, cfg.teacher_ema,
                                    cfg.P_mean, cfg.P_std)
    saved_cfg = dataclasses.replace(cfg, sigma_data=teacher.sigma_data)
    atomic_save(dict(config=dataclasses.asdict(saved_cfg), denoiser=denoiser_to_dict(teacher), losses=losses), path)


def get_teacher(cfg, out):
    """The teacher from --teacher, from OUT/teacher.pt, or trained now with EDM's loss (by process 0)."""
    if cfg.teacher:
        teacher = load_teacher(cfg.teacher, cfg)
        check_teacher(teacher, cfg, cfg.teacher)
        return teacher
    path = out / "teacher.pt"
    if not path.exists():
        if cfg.dataset not in PROCEDURAL and cfg.stage != "teacher":
            url = EDM_TEACHERS.get(f"{cfg.dataset}-{'uncond' if cfg.unconditional else 'cond'}")
            released = f"EDM's released teacher with --teacher {url}" if url else "a teacher with --teacher PATH"
            raise DMDError(f"no teacher for {data_name(cfg.dataset, cfg.toy, cfg.unconditional)} in {out}: "
                           f"distil {released}, or train one here first with --stage teacher --data-dir DIR")
        if dist.rank() == 0:
            torch.manual_seed(cfg.seed)
            train_new_teacher(cfg, path)
    elif dist.rank() == 0:
        print(f"reusing the teacher in {path}")
    dist.barrier()   # the others wait for process 0's teacher
    fix = redo_advice(out, "teacher.pt", "teacher")   # and what was made from it: no pairs of another teacher
    saved = load_file(path, "teacher", required=("config", "denoiser"), fix=fix)
    check_same(saved["config"], dataclasses.replace(cfg, sigma_data=saved["config"]["sigma_data"]),
               TEACHER_FIELDS, path, fix)
    return denoiser_from_dict(saved["denoiser"])
