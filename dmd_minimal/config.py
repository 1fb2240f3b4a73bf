"""One flat Config for every run, the per-dataset PRESETS, and the command line built from them.

Every field becomes a flag (`lambda_reg` -> `--lambda-reg`, booleans as `--flag/--no-flag`), its
trailing comment the flag's help. A preset holds only what differs from the defaults, with the
source of each value. Checkpoints store asdict(cfg), so a run can be rebuilt exactly.
"""
import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass


@dataclass
class Config:
    # run
    dataset: str = "toy2d"             # toy2d (cifar10 and imagenet64 come with the image pipeline)
    toy: str = "grid25"                # toy2d data: grid25, ring8, moons, checkerboard, swissroll
    out: str = ""                      # output folder (default runs/<dataset>-<toy>); rerunning resumes it
    teacher: str = ""                  # a teacher checkpoint to distil (default: train one into OUT/teacher.pt)
    seed: int = 0                      # seeds the teacher, the pairs and DMD
    device: str = ""                   # cpu, cuda, cuda:1 ... (default: cuda when available)
    # networks (the teacher's; generator and fake score are copies of it)
    arch: str = "mlp"                  # backbone of the teacher
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
    P_mean: float = -1.2               # ln(sigma) ~ N(P_mean, P_std^2) (EDM)
    P_std: float = 1.2                 # (see P_mean)
    # regression pairs (DMD §3.3)
    num_pairs: int = 20000             # noise -> teacher-output pairs
    pair_steps: int = 18               # Heun steps of the teacher's ODE for each pair
    # DMD
    dmd_steps: int = 2000              # generator updates
    batch_size: int = 1024             # distribution-matching batch (the regression batch is as large)
    lr: float = 1e-3                   # AdamW learning rate of the generator
    fake_lr: float = 1e-3              # AdamW learning rate of the fake score
    weight_decay: float = 0.01         # AdamW weight decay (both networks)
    warmup_steps: int = 0              # linear learning-rate warm-up
    cosine_decay: bool = False         # decay both learning rates to 0 with a cosine
    grad_clip: float = 10.0            # max L2 norm of each network's gradient
    lambda_reg: float = 0.25           # weight of the regression loss (0: no regression)
    distribution_matching: bool = True  # use the distribution-matching loss (--no-distribution-matching: regression only)
    real_score_only: bool = False      # ablation: follow the real score alone, no fake score (Fig. 3)
    fake_steps_per_generator_step: int = 1   # fake-score updates per generator update (DMD 1, DMD2 5)
    num_levels: int = 1000             # size of the discrete sigma grid
    dm_min_level: int = 20             # distribution matching draws grid indices in [min, max] (2%-98%)
    dm_max_level: int = 980
    # logging and evaluation
    log_every: int = 100               # steps between log lines / loss-curve points
    checkpoint_every: int = 500        # steps between checkpoints
    num_eval: int = 10000              # samples drawn for metrics.json and samples.npz


PRESETS = {
    # toy2d: sized to finish in about 3 minutes on 2 CPU cores (DMD.md §10 and our own sweeps). The
    # paper's lr 5e-5 is far too slow at this scale; lambda_reg 1 and a cosine decay gave sharper modes.
    "toy2d": dict(teacher_steps=4000, teacher_batch=256, dmd_steps=2000, batch_size=256, lr=2e-3,
                  fake_lr=2e-3, lambda_reg=1.0, cosine_decay=True),
}


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
        if f.name == "dataset":
            parser.add_argument(flag, choices=sorted(PRESETS), help=text)
        elif f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, type=type(f.default), metavar=f.name.upper(), help=text)
    return parser


def make_config(dataset="toy2d", **overrides):
    """The defaults, then the dataset's preset, then the overrides: make_config("toy2d", toy="ring8")."""
    return Config(**{**PRESETS[dataset], **overrides, "dataset": dataset})


def parse_config(argv=None):
    """make_config from the command line's flags."""
    return make_config(**vars(build_parser().parse_args(argv)))
