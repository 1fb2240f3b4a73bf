"""The teacher: a released one loaded (EDM's snapshots), or one trained here with EDM's loss (EDM §5).

A teacher trained here is saved with its config as OUT/teacher.pt and reused while the fields that
shaped it (TEACHER_FIELDS, its network as built, and a folder's path) agree. The weights kept are an
exponential moving average of the trained ones, as in EDM.
"""
import copy
import dataclasses
import math
import time
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

from . import dist
from .checkpoint import check_same, redo_advice
from .config import TEACHER_NETWORKS
from .data import DATA_SPECS, infinite_loader, load_dataset
from .denoiser import edm_loss
from .load import EDM_TEACHERS, load_denoiser
from .networks import build_denoiser, denoiser_from_dict, denoiser_to_dict, sample_shape
from .toy2d import sample_toy
from .utils import DMDError, atomic_save, hide_progress, load_file

# Fields that must agree with a saved teacher for it to be reused. An image teacher's network is compared
# as built (teacher_network), not as flags: an empty --channel-mult means the preset's, which may change.
TEACHER_FIELDS = ("dataset", "toy", "arch", "hidden", "depth", "sigma_data", "teacher_steps", "teacher_batch",
                  "teacher_lr", "teacher_ema", "teacher_ema_rampup", "P_mean", "P_std", "seed", "resolution",
                  "unconditional", "xflip")
# Data sets small enough to train a teacher on a CPU: a missing teacher is trained without asking.
TRAINED_HERE = ("toy2d", "shapes", "fashion-mnist", "mnist", "folder")


@torch.no_grad()
def ema_update(ema, net, decay):
    """ema <- decay ema + (1 - decay) net, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def ema_decay(decay, batch_size, images_seen, rampup=0.0):
    """The EMA decay of one step (EDM training_loop.py): `decay` is a half-life of batch ln 0.5 / ln decay
    images; with a ramp-up the half-life is at most rampup * images_seen, so early weights fade fast."""
    if not rampup:
        return decay
    half_life = batch_size * math.log(0.5) / math.log(decay)        # in images
    half_life = min(half_life, rampup * images_seen)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


def train_teacher(denoiser, next_batch, steps, lr, ema=(0.999, 0.0), P_mean=-1.2, P_std=1.2):
    """Train `denoiser` on batches (x, class_labels) from next_batch(); returns the EMA copy and the loss curve.

    ema: (decay, ramp-up ratio), see ema_decay.
    """
    ema_net = copy.deepcopy(denoiser).requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses, images_seen = [], 0
    bar = tqdm(range(steps), desc="teacher", mininterval=1.0, disable=hide_progress())
    clock = time.perf_counter()
    for step in bar:
        x, class_labels = next_batch()
        loss = edm_loss(denoiser, x, class_labels, P_mean, P_std)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        images_seen += len(x)
        ema_update(ema_net, denoiser, ema_decay(ema[0], len(x), images_seen, ema[1]))
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            rate, clock = 100 * len(x) / (time.perf_counter() - clock), time.perf_counter()
            bar.set_postfix(loss=f"{sum(losses[-100:]) / 100:.4f}", images_per_s=f"{rate:.0f}")
    return ema_net, losses


def data_spec(cfg):
    """(shape of a sample, number of classes) of cfg's data: what the teacher must fit.

    Named image datasets have a fixed spec (data.DATA_SPECS); a `folder` is read to find its own.
    """
    if cfg.dataset == "toy2d":
        return (2,), 0
    if cfg.dataset == "folder":
        dataset = load_dataset("folder", cfg.data_dir or None)
        channels, resolution, classes = dataset.channels, dataset.resolution, dataset.num_classes
    else:
        channels, resolution, classes = DATA_SPECS[cfg.dataset]
    resolution = cfg.resolution or resolution
    return (channels, resolution, resolution), 0 if cfg.unconditional else classes


def xflip(x):
    """EDM's x-flip augmentation: each image [C, H, W] of x mirrored left-right with probability 1/2."""
    flip = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def teacher_network(cfg, shape):
    """The backbone keyword arguments of an image teacher trained here: TEACHER_NETWORKS', shaped by the
    data and by --model-channels / --channel-mult / --num-blocks."""
    network = dict(TEACHER_NETWORKS[cfg.dataset], in_channels=shape[0], out_channels=shape[0], img_resolution=shape[1])
    network["model_channels"] = cfg.model_channels or network["model_channels"]
    network["num_blocks"] = cfg.num_blocks or network["num_blocks"]
    if cfg.channel_mult:   # checked by config.validate: integers like 1,2,2
        network["channel_mult"] = [int(m) for m in cfg.channel_mult.split(",")]
    return network


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
        if (dataset.channels, dataset.resolution) != shape[:2]:
            raise DMDError(f"{cfg.data_dir} holds {dataset.resolution}x{dataset.resolution} images with "
                           f"{dataset.channels} channel(s), not {shape[1]}x{shape[1]} with {shape[0]}")
        if label_dim and not 0 < dataset.num_classes <= label_dim:
            raise DMDError(f"{cfg.data_dir} has {dataset.num_classes} classes, not up to {label_dim}: "
                           f"--unconditional ignores the labels")
        teacher = build_denoiser(sigma_data=cfg.sigma_data, label_dim=label_dim, **teacher_network(cfg, shape))
        batches = infinite_loader(dataset, cfg.teacher_batch, cfg.seed)

        def next_batch():
            x, labels = next(batches)
            x = xflip(x.to(cfg.device)) if cfg.xflip else x.to(cfg.device)
            return x, labels.to(cfg.device) if label_dim else None
    teacher.to(cfg.device).amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else None   # fp16 needs a GradScaler
    teacher, losses = train_teacher(teacher, next_batch, cfg.teacher_steps, cfg.teacher_lr,
                                    (cfg.teacher_ema, cfg.teacher_ema_rampup), cfg.P_mean, cfg.P_std)
    saved_cfg = dataclasses.replace(cfg, sigma_data=teacher.sigma_data)
    atomic_save(dict(config=dataclasses.asdict(saved_cfg), denoiser=denoiser_to_dict(teacher), losses=losses), path)


def released_teacher(cfg):
    """The URL of EDM's released teacher for cfg's data (cifar10 cond / uncond, imagenet64), or ""."""
    return EDM_TEACHERS.get(f"{cfg.dataset}-{'uncond' if cfg.unconditional else 'cond'}", "")


def get_teacher(cfg, out):
    """The teacher from --teacher, from OUT/teacher.pt, or trained now with EDM's loss (in one process)."""
    if cfg.teacher:
        teacher = load_teacher(cfg.teacher, cfg)
        check_teacher(teacher, cfg, cfg.teacher)
        return teacher
    path = out / "teacher.pt"
    if not path.exists():
        if cfg.dataset not in TRAINED_HERE and cfg.stage != "teacher":
            raise DMDError(f"no teacher for {data_name(cfg.dataset, cfg.toy, cfg.unconditional)} in {out}: "
                           f"distil one with --teacher PATH, or train one here first with --stage teacher --data-dir DIR")
        if dist.world_size() > 1:   # one process training while the others wait would outlast any timeout
            raise DMDError(f"a teacher trains in one process: run this command with --stage teacher without "
                           f"torchrun first (it writes {path}), then under torchrun to distil it")
        torch.manual_seed(cfg.seed)
        train_new_teacher(cfg, path)
    elif dist.rank() == 0:
        print(f"reusing the teacher in {path}")
    fix = redo_advice(out, "teacher.pt", "teacher")   # and what was made from it: no pairs of another teacher
    saved = load_file(path, "teacher", required=("config", "denoiser"), fix=fix)
    # A folder's path names its images; for the named data sets --data-dir only says where the same files are.
    fields = TEACHER_FIELDS + (("data_dir",) if cfg.dataset == "folder" else ())
    check_same(saved["config"], dataclasses.replace(cfg, sigma_data=saved["config"]["sigma_data"]), fields, path, fix)
    teacher = denoiser_from_dict(saved["denoiser"])
    if cfg.dataset != "toy2d":
        network = teacher_network(cfg, sample_shape(teacher))
        for name, value in dict(arch=saved["denoiser"]["arch"], **saved["denoiser"]["arch_kwargs"]).items():
            if name in network and network[name] != value:
                raise DMDError(f"{path} has a network with {name}={value!r}, not the {network[name]!r} that "
                               f"the {cfg.dataset} preset and --model-channels/--channel-mult/--num-blocks "
                               f"give: {fix}")
    return teacher
