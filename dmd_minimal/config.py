"""One flat Config for every run, the per-dataset PRESETS, and the command line built from them.

Every field becomes a flag (`lambda_reg` -> `--lambda-reg`, booleans as `--flag/--no-flag`), its
trailing comment the flag's help. A preset holds only what differs from the defaults, with the
source of each value. Checkpoints store asdict(cfg), so a run can be rebuilt exactly.
"""
import argparse
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass

from .networks import IMAGE_NETWORKS
from .utils import DMDError, check_option


@dataclass
class Config:
    # run
    dataset: str = "toy2d"             # toy2d; images: cifar10, imagenet64, fashion-mnist, mnist, folder (DATA_DIR's), shapes
    toy: str = "grid25"                # toy2d data: grid25, ring8, moons, checkerboard, swissroll
    out: str = ""                      # output folder (default runs/<dataset>-<toy>); rerunning resumes it
    stage: str = "dmd"                 # run up to: teacher, pairs or dmd; each stage reuses what OUT holds
    teacher: str = ""                  # teacher to distil: our .pt, an EDM .pkl or its URL (default: OUT/teacher.pt)
    resume: str = ""                   # checkpoint to continue (default: OUT/checkpoint.pt when it exists)
    seed: int = 0                      # seeds the teacher, the pairs and DMD
    device: str = ""                   # cpu, cuda, cuda:1 ... (default: cuda when available; torchrun: cuda:LOCAL_RANK)
    precision: str = ""                # fp32, bf16 or fp16 autocast of the networks (default: bf16 on GPUs that have it, fp16 on older GPUs, else fp32)
    dist_timeout: int = 1800           # seconds a process waits for the others in a collective before the run stops (torchrun)
    dry_run: bool = False              # build the preset's networks with random weights, time two DMD iterations, print a plan; write nothing
    tensorboard: bool = False          # also write the logged scalars and the image grids to OUT/tensorboard
    # images (teacher training from scratch; distillation itself needs only the teacher and its pairs)
    data_dir: str = ""                 # training images (data.py; fashion-mnist: Debian's folder when installed)
    download: bool = False             # fetch CIFAR-10, MNIST or Fashion-MNIST into DATA_DIR if missing
    resolution: int = 0                # image side (presets: 32, 64, 16); the teacher must match it
    unconditional: bool = False        # ignore the class labels (CIFAR-10: EDM's uncond-vp teacher)
    model_channels: int = 0            # width of an image teacher trained here (0: TEACHER_NETWORKS' width)
    channel_mult: str = ""             # its depth: width factor per resolution, e.g. 1,2,2 (TEACHER_NETWORKS')
    num_blocks: int = 0                # its residual blocks per resolution (0: TEACHER_NETWORKS')
    xflip: bool = False                # teacher: flip half the images left-right (EDM's x-flip; not for digits)
    # networks (the teacher's; generator and fake score are copies of it)
    arch: str = "mlp"                  # backbone of a toy2d teacher (image teachers: TEACHER_NETWORKS)
    hidden: int = 128                  # MLP width
    depth: int = 4                     # MLP hidden layers
    sigma_data: float = 0.0            # data std in EDM's preconditioning (0: measure it from the data)
    sigma_min: float = 0.002           # Karras schedule (EDM): smallest noise level
    sigma_max: float = 80.0            # largest noise level; the generator maps sigma_max z to data
    rho: float = 7.0                   # Karras schedule curvature
    # teacher training (EDM loss), skipped when a teacher exists
    teacher_steps: int = 5000          # optimisation steps
    teacher_batch: int = 1024          # batch size
    teacher_lr: float = 2e-3           # Adam learning rate, cosine-decayed to 0
    teacher_ema: float = 0.999         # EMA decay of the weights kept as the teacher
    teacher_ema_rampup: float = 0.0    # EDM's ramp-up: EMA half-life <= this share of images seen (EDM 0.05)
    P_mean: float = -1.2               # ln(sigma) ~ N(P_mean, P_std^2) (EDM)
    P_std: float = 1.2                 # (see P_mean)
    # regression pairs (DMD §3.3)
    num_pairs: int = 20000             # noise -> teacher-output pairs
    pair_steps: int = 18               # Heun steps of the teacher's ODE for each pair
    regression_batch: int = 0          # pairs per regression batch of all processes together (0: --batch-size, DMD's choice)
    regression_loss: str = ""          # lpips (VGG) or l2 (squared error) (default: lpips for images, l2 for toy2d)
    lpips_resolution: int = 224        # LPIPS sees images upsampled bilinearly to this side (DMD: 224)
    lpips_pooling: str = "avg"         # VGG16's pooling in LPIPS: avg (PIQ's, as DMD used it) or max (the original)
    # DMD
    dmd_steps: int = 2000              # generator updates
    batch_size: int = 1024             # distribution-matching batch of all processes together
    batch_gpu: int = 0                 # images one process holds at once; each step accumulates its share in batches of this (0: all)
    lr: float = 1e-3                   # AdamW learning rate of the generator
    fake_lr: float = 1e-3              # AdamW learning rate of the fake score
    weight_decay: float = 0.01         # AdamW weight decay (both networks)
    warmup_steps: int = 0              # linear learning-rate warm-up
    cosine_decay: bool = False         # decay both learning rates to 0 with a cosine
    grad_clip: float = 10.0            # max L2 norm of each network's gradient
    max_skipped_steps: int = 20        # stop after this many updates in a row skipped for a non-finite gradient
    lambda_reg: float = 0.25           # weight of the regression loss (0: no regression)
    distribution_matching: bool = True  # use the distribution-matching loss (--no-distribution-matching: regression only)
    real_score_only: bool = False      # ablation: follow the real score alone, no fake score (Fig. 3)
    fake_steps_per_generator_step: int = 1   # fake-score updates per generator update (DMD 1, DMD2 5)
    ema: float = 0.0                   # EMA decay of the generator's weights (0: off, as in the paper)
    num_levels: int = 1000             # size of the discrete sigma grid
    dm_min_level: int = 20             # distribution matching draws grid indices in [min, max] (2%-98%)
    dm_max_level: int = 980
    # logging and evaluation
    log_every: int = 100               # steps between lines of OUT/log.jsonl (and loss-curve points)
    checkpoint_every: int = 500        # steps between checkpoints
    keep_checkpoints: int = 2          # checkpoints kept: the latest as checkpoint.pt, the ones before it as checkpoint-STEP.pt
    sample_every: int = 1000           # steps between image grids OUT/grids/STEP.png, from fixed noise
    grid_size: int = 64                # images in a grid (0: no grids)
    num_eval: int = 10000              # toy2d: samples drawn for metrics.json and samples.npz
    eval_every: int = 0                # images: steps between FID evaluations of the one-step generator (0: off)
    eval_num: int = 1000               # images: samples per evaluation, from fixed noise and balanced labels


PRESETS = {
    # toy2d: sized to finish in about 3 minutes on 2 CPU cores (DMD.md §10 and our own sweeps). The
    # paper's lr 5e-5 is far too slow at this scale: a one-step map onto 25 separate modes must become
    # steep between them, and on grid25 (seed 0, 2000 steps) the generator's high-quality share rose
    # from 0.36 at lr 2e-3 to 0.72 at 5e-3 and 0.83 at 1e-2 without weight decay. lambda_reg 1 and a
    # cosine decay gave sharper modes. The teacher takes the defaults (5000 steps at batch 1024, DMD.md
    # §10): on grid25 seed 0 its Heun-18 high-quality share was 0.899 at 4000 x 256, 0.937 at 5000 x 512,
    # 0.950 at 5000 x 1024 (0.804 at 3000 x 1024). Distilling the last, the generator reached 0.839 at
    # batch 256 (0.836 with EMA 0.995, 0.866 with 3000 steps) and 0.877 at batch 512.
    "toy2d": dict(dmd_steps=2000, batch_size=512, lr=1e-2,
                  fake_lr=5e-3, weight_decay=0.0, lambda_reg=1.0, cosine_decay=True),
    # The paper's runs (DMD Appendix B, DMD.md §7). The defaults already hold the rest: AdamW betas
    # (0.9, 0.999), weight decay 0.01, grad clip 10, lambda_reg 0.25, 1000 sigma levels, DM in [20, 980].
    "cifar10": dict(resolution=32, sigma_data=0.5,  # EDM: images in [-1, 1]
                    batch_size=392,                 # 7 GPUs x 56
                    lr=5e-5, fake_lr=5e-5,
                    warmup_steps=500,
                    dmd_steps=300_000,
                    num_pairs=100_000,              # conditional; see UNCONDITIONAL
                    pair_steps=18,                  # Heun, 35 NFE (EDM's CIFAR-10 sampler)
                    # A teacher from scratch (--stage teacher): EDM's README `--cond=1 --arch=ddpmpp` with
                    # EDM train.py's defaults: batch 512, lr 1e-3, 200 Mimg, EMA half-life 0.5 Mimg.
                    teacher_batch=512, teacher_lr=1e-3, teacher_steps=390_625, teacher_ema=0.99929,
                    eval_every=5000),               # Inception FID against EDM's statistics where they are cached
    "imagenet64": dict(resolution=64, sigma_data=0.5,
                       batch_size=336,              # 7 GPUs x 48
                       lr=2e-6, fake_lr=2e-6,
                       warmup_steps=500,
                       dmd_steps=350_000,
                       num_pairs=25_000,
                       pair_steps=256,              # Heun, 511 NFE
                       # A teacher from scratch: EDM's README for edm-imagenet-64x64-cond-adm: batch 4096,
                       # lr 1e-4, 2500 Mimg, EMA half-life 50 Mimg (32 A100s for 13 days).
                       teacher_batch=4096, teacher_lr=1e-4, teacher_steps=610_352, teacher_ema=0.999943,
                       eval_every=5000),
    # shapes: 16x16 procedural images (data.py) for the tests and the tutorial, sized for minutes on a
    # CPU (a teacher step of batch 32 is ~3.5 GFLOP). LPIPS would upsample every image to 224x224 for
    # VGG, far too slow on a CPU (and its weights need a download): l2 instead. The fake score learns
    # 4x faster than the generator: with both at 2e-4 it fell behind at this small batch, and the
    # generator drifted into dark noise (8x8 shapes, 150 steps: per-image std 0.16, data 0.53); at
    # 5e-5 / 2e-4 it made shapes (0.42), like DMD2's 5 fake-score steps per generator step (0.43).
    "shapes": dict(resolution=16, sigma_data=0.5,
                   teacher_steps=1500, teacher_batch=32, teacher_lr=2e-3, teacher_ema=0.99,
                   num_pairs=512, dmd_steps=300, batch_size=32, lr=5e-5, fake_lr=2e-4,
                   regression_loss="l2",
                   log_every=10, checkpoint_every=100, sample_every=50),
}
# fashion-mnist / mnist: 28x28 grayscale, sized for 2 CPU cores. The teacher's network is TEACHER_NETWORKS';
# EDM's loss, Adam with a cosine decay, and EDM's EMA ramp-up (0.05) over a 0.999 decay at most.
# Fashion-MNIST's clothes are left-right symmetric, digits are not: x-flip for the first only.
# DMD at batch 32 with the paper's lr 5e-5 (its AdamW, lambda_reg 0.25, DM in 2%-98%, one fake step): the
# fake score must learn faster than the generator at this small batch. On one teacher ([1, 2, 2]; FID in the
# classifier's features, 1000 samples, steps 200 / 400 / 600 / 800): fake lr 2e-4 gave 59 / 44 / 17 / 16,
# then drifted (41 at 1800); 1e-3 gave 12 / 18 / 16 / 21; lambda_reg 1 with 2e-4, 55 / 24 / 20 / 19. Recall
# stayed at 0.34-0.43 in all three (the teacher's Heun 18: 0.76). A cosine decay lets the generator settle.
# With it: generator lr 2e-4 ended level (15.4), 5e-4 outran the fake score; batch 64 or 2500 steps lifted
# recall to 0.50 / 0.53 only, for 2x / 2.5x the time (README, "Distilling it").
MNIST_LIKE = dict(resolution=28, sigma_data=0.5,
                  teacher_steps=2000, teacher_batch=128, teacher_lr=1e-3, teacher_ema=0.999, teacher_ema_rampup=0.05,
                  num_pairs=5000, dmd_steps=1000, batch_size=32, lr=5e-5, fake_lr=1e-3, cosine_decay=True,
                  regression_loss="l2",            # LPIPS needs VGG16's ImageNet weights and a 224x224 pass
                  log_every=20, checkpoint_every=200, sample_every=200, eval_every=200, eval_num=1000)
PRESETS["fashion-mnist"] = dict(MNIST_LIKE, xflip=True)
PRESETS["mnist"] = dict(MNIST_LIKE)
# folder: a user's own images; channels, resolution and classes come from the data. The defaults are
# the shapes run's small sizes; set the network with --model-channels / --channel-mult / --num-blocks.
PRESETS["folder"] = dict(PRESETS["shapes"], resolution=0)
UNCONDITIONAL = {   # what --unconditional changes on top of the preset
    "cifar10": dict(lambda_reg=0.5, num_pairs=500_000),   # DMD Appendix B, EDM's uncond-vp teacher
}

# The networks of image teachers trained from scratch (--stage teacher). Distilling a released teacher
# takes its own network instead. EDM's augmentation labels are left out: we train without augmentation.
TEACHER_NETWORKS = {
    "cifar10": dict(IMAGE_NETWORKS["cifar10"], augment_dim=0),
    "imagenet64": dict(IMAGE_NETWORKS["imagenet64"], augment_dim=0),
    "shapes": dict(arch="songunet",
                   model_channels=16,
                   channel_mult=[1, 2],             # 16x16 and 8x8
                   num_blocks=1,
                   attn_resolutions=[],
                   dropout=0.0),
    # 28x28 grayscale: 0.71M parameters, ~160 training images/s on 2 CPU cores. 64 channels at 7x7 cost
    # 1.37x the time of 32 there ([1, 2, 2], 0.31M) and lift the one-step generator's recall from 0.64x
    # its teacher's to 0.71x; 32 channels everywhere would cost 2.7x (README, after the ablation table).
    "fashion-mnist": dict(arch="songunet",
                          model_channels=16,
                          channel_mult=[1, 2, 4],   # 28x28, 14x14 and 7x7
                          num_blocks=1,
                          attn_resolutions=[],
                          dropout=0.0),
}
TEACHER_NETWORKS["mnist"] = TEACHER_NETWORKS["fashion-mnist"]
TEACHER_NETWORKS["folder"] = dict(TEACHER_NETWORKS["shapes"], channel_mult=[1, 2, 2])
CHOICES = {"dataset": sorted(PRESETS), "stage": ("teacher", "pairs", "dmd"),
           "precision": ("fp32", "bf16", "fp16"), "regression_loss": ("lpips", "l2"),
           "lpips_pooling": ("avg", "max")}
# The range of each numeric field (validate); every float must also be finite.
AT_LEAST = {0: ("seed", "resolution", "model_channels", "num_blocks", "teacher_ema_rampup", "sigma_data",
                "regression_batch", "batch_gpu", "weight_decay", "warmup_steps", "lambda_reg", "grid_size", "dm_min_level", "eval_every"),
            1: ("hidden", "depth", "teacher_steps", "teacher_batch", "num_pairs", "pair_steps", "lpips_resolution",
                "dmd_steps", "batch_size", "fake_steps_per_generator_step", "max_skipped_steps", "log_every",
                "checkpoint_every", "keep_checkpoints", "sample_every", "dist_timeout"),
            2: ("num_levels", "num_eval")}   # a grid needs two ends; the energy distance, two samples
POSITIVE = ("sigma_min", "rho", "teacher_lr", "P_std", "lr", "fake_lr", "grad_clip")
DECAYS = ("teacher_ema", "ema")   # in [0, 1): 1 would freeze the average at its start


def validate(cfg):
    """A one-line error for the first numeric field out of its range: every flag is checked here, before any work."""
    def check(name, ok, must):
        check_option(ok, "--" + name.replace("_", "-"), getattr(cfg, name), must)
    for f in dataclasses.fields(cfg):
        if isinstance(getattr(cfg, f.name), float):
            check(f.name, math.isfinite(getattr(cfg, f.name)), "a finite number")
    for lowest, names in AT_LEAST.items():
        for name in names:
            check(name, getattr(cfg, name) >= lowest, f">= {lowest}")
    for name in POSITIVE:
        check(name, getattr(cfg, name) > 0, "> 0")
    for name in DECAYS:
        check(name, 0 <= getattr(cfg, name) < 1, "in [0, 1)")
    check("sigma_max", cfg.sigma_max > cfg.sigma_min, f"> --sigma-min {cfg.sigma_min}")
    check("channel_mult", re.fullmatch(r"(\d+,)*\d+|", cfg.channel_mult) is not None, "integers like 1,2,2")
    if cfg.eval_every:   # precision and recall with k = 3 need more than 3 samples
        check("eval_num", cfg.eval_num >= 4, ">= 4 with --eval-every")
    check("dm_max_level", cfg.dm_min_level <= cfg.dm_max_level < cfg.num_levels,
          f"in [--dm-min-level {cfg.dm_min_level}, --num-levels {cfg.num_levels})")
    if cfg.dataset != "toy2d":   # toy2d measures sigma_data itself and has no images
        check("sigma_data", cfg.sigma_data > 0, f"> 0 for {cfg.dataset}")
    if cfg.dataset not in ("toy2d", "folder"):   # a folder's images have their own resolution (0: take it)
        check("resolution", cfg.resolution >= 1, f">= 1 for {cfg.dataset}")
    if cfg.lambda_reg > 0 and cfg.num_pairs < regression_batch(cfg):
        flag = f"--regression-batch {cfg.regression_batch}" if cfg.regression_batch else f"--batch-size {cfg.batch_size}"
        raise DMDError(f"--num-pairs {cfg.num_pairs} is smaller than one regression batch ({flag}); "
                       f"fewer pairs need a smaller --regression-batch")


def regression_batch(cfg):
    """Pairs per regression batch, all processes together: --regression-batch, or as many as --batch-size (DMD §3.3)."""
    return cfg.regression_batch or cfg.batch_size


def field_help():
    """The trailing comment of each Config field, as its --help text."""
    source = inspect.getsource(Config)
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", source, flags=re.M))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m dmd_minimal.train",
        description="Distil a diffusion teacher into a one-step generator with DMD (arXiv 2311.18828).",
        argument_default=argparse.SUPPRESS)
    helps = field_help()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {f.default!r})".replace("%", "%%")
        if f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], help=text)
        elif f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, type=type(f.default), metavar=f.name.upper(), help=text)
    return parser


def make_config(dataset="toy2d", **overrides):
    """The defaults, then the dataset's preset (and UNCONDITIONAL's), then the overrides.

    make_config("toy2d", toy="ring8"), make_config("cifar10", unconditional=True, teacher=url)
    """
    preset = PRESETS[dataset]
    if overrides.get("unconditional"):
        preset = {**preset, **UNCONDITIONAL.get(dataset, {})}
    return Config(**{**preset, **overrides, "dataset": dataset})


def parse_config(argv=None):
    """make_config from the command line's flags."""
    return make_config(**vars(build_parser().parse_args(argv)))
