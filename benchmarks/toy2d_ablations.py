"""The paper's Table 2 and Fig. 3 in miniature: which parts of DMD matter, on grid25 and ring8.

    python benchmarks/toy2d_ablations.py                      # grid25 and ring8, seeds 0 1 2
    python benchmarks/toy2d_ablations.py --toys grid25 --seeds 0 --dmd-steps 500

For every toy and seed one teacher is trained (the toy2d preset), then each variant below distils it
with the same budget. The teacher rows come from the same runs (its Heun and one-step Euler samples).
Prints a markdown table (mean ± std over seeds) and writes it, with a figure of the first seed's
samples (data, teacher, each variant), into --out. Every run is an ordinary `train(cfg)` folder, so
a rerun reuses what is finished.
"""
import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from dmd_minimal.config import make_config
from dmd_minimal.load import load_denoiser
from dmd_minimal.plots import scatter_panels
from dmd_minimal.sampler import sample_ode
from dmd_minimal.toy2d import sample_toy
from dmd_minimal.train import train

VARIANTS = {   # name: config overrides (DMD.md §4-6; DMD2 = arXiv 2405.14867's two time-scale rule)
    "DMD": {},
    "DMD without regression": dict(lambda_reg=0.0),
    "regression only": dict(distribution_matching=False),
    "real score only": dict(real_score_only=True, lambda_reg=0.0),
    "DMD2 option (5 fake steps, no regression)": dict(fake_steps_per_generator_step=5, lambda_reg=0.0),
}
TEACHER_ROWS = {"teacher, Heun 18 steps": "teacher_heun18", "teacher, 1 Euler step": "teacher_euler1"}
COLUMNS = ("nfe", "modes", "high_quality", "mode_kl", "energy_distance")


def run_variant(toy, seed, name, overrides, out, dmd_steps):
    """metrics.json of one variant; the first variant trains the teacher that the others reuse."""
    folder = out / toy / f"seed{seed}" / name.split(" (")[0].replace(" ", "_")
    teacher = out / toy / f"seed{seed}" / "DMD" / "teacher.pt"
    extra = dict(dmd_steps=dmd_steps) if dmd_steps else {}
    cfg = make_config("toy2d", toy=toy, seed=seed, out=str(folder), **extra, **overrides)
    if name != "DMD":
        cfg = dataclasses.replace(cfg, teacher=str(teacher))
    if not (folder / "metrics.json").exists():
        torch.manual_seed(seed)
        train(cfg)
    return json.loads((folder / "metrics.json").read_text()), folder


@torch.no_grad()
def reference_panels(toy, teacher_path, n=5000):
    """Fresh data, and the teacher's Heun-18 and one-step samples from one fixed noise."""
    teacher = load_denoiser(teacher_path)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    return {"data": sample_toy(toy, n, torch.Generator().manual_seed(0)),
            "teacher, Heun 18 steps": sample_ode(teacher, z, 18),
            "teacher, 1 Euler step": sample_ode(teacher, z, 1)}


def summarise(values):
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3g} ± {spread:.2g}" if spread else f"{mean:.3g}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toys", nargs="+", default=["grid25", "ring8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dmd-steps", type=int, default=0, help="override the preset's DMD steps (0: keep)")
    parser.add_argument("--out", default="runs/ablations")
    args = parser.parse_args()
    out = Path(args.out)
    lines = []
    for toy in args.toys:
        rows = {}   # row name -> list of metric dicts over seeds
        panels = {}
        for seed in args.seeds:
            for name, overrides in VARIANTS.items():
                metrics, folder = run_variant(toy, seed, name, overrides, out, args.dmd_steps)
                if name == "DMD":
                    for row, key in TEACHER_ROWS.items():
                        rows.setdefault(row, []).append(metrics[key])
                rows.setdefault(name, []).append(metrics["generator"])
                if seed == args.seeds[0]:
                    if name == "DMD":
                        panels.update(reference_panels(toy, folder / "teacher.pt"))
                    panels[name] = np.load(folder / "samples.npz")["x"]
        seeds = f"{len(args.seeds)} seeds: mean ± std" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
        lines += [f"\n### {toy} ({seeds})\n",
                  "| variant | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        lines += [f"| {row} | " + " | ".join(summarise([m[c] for m in ms]) for c in COLUMNS) + " |"
                  for row, ms in rows.items()]
        out.mkdir(parents=True, exist_ok=True)
        scatter_panels({name.split(" (")[0]: x for name, x in panels.items()}, out / f"{toy}.png", columns=4)
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    print(f"\nwrote {out}/table.md and {', '.join(f'{out}/{t}.png' for t in args.toys)}")


if __name__ == "__main__":
    main()
