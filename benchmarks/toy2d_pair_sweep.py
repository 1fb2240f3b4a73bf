"""What distribution matching is for: DMD against regression alone as the regression pairs get scarce.

    python benchmarks/toy2d_pair_sweep.py                              # grid25 and ring8, seeds 0 1 2
    python benchmarks/toy2d_pair_sweep.py --toys grid25 --seeds 0 --counts 32 20000

The paper's regime is few pairs for what the data needs (DMD §3.3: 25k pairs for 1000 ImageNet
classes); only the distribution-matching loss sees fresh samples. For every toy and seed one teacher is
trained (the toy2d preset) and reused; then, at each pair count, full DMD and regression only
(--no-distribution-matching) distil it with the preset's budget. The regression batch is
min(pairs, --batch-size) (--regression-batch). Besides the mode metrics, the copying distance
|G(z) - teacher ODE(z)| on held-out noise and on the training pairs tells learning the teacher's map
from memorising its pairs. Prints a markdown table (mean ± std over seeds) and writes it and a figure
into --out (pair_sweep_<toys>.md and .png). Every run is an ordinary `train(cfg)` folder, so a rerun
reuses what is finished.
"""
import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dmd_minimal.config import make_config  # noqa: E402
from dmd_minimal.toy2d import mixture_centers  # noqa: E402
from dmd_minimal.train import train  # noqa: E402

VARIANTS = {"DMD": {}, "regression only": dict(distribution_matching=False)}
COLUMNS = ("modes", "high_quality", "mode_kl", "energy_distance", "copy_heldout", "copy_pairs")


def run(toy, seed, name, count, out):
    """metrics.json of one variant at one pair count, distilling the seed's shared teacher."""
    root = out / toy / f"seed{seed}"
    teacher = root / "teacher" / "teacher.pt"
    if not teacher.exists():
        train(make_config("toy2d", toy=toy, seed=seed, out=str(teacher.parent), stage="teacher"))
    folder = root / f"{name.replace(' ', '_')}-{count}"
    cfg = make_config("toy2d", toy=toy, seed=seed, out=str(folder), teacher=str(teacher), num_pairs=count,
                      **VARIANTS[name])
    cfg = dataclasses.replace(cfg, regression_batch=min(count, cfg.batch_size))
    if not (folder / "metrics.json").exists():
        torch.manual_seed(seed)
        train(cfg)
    return json.loads((folder / "metrics.json").read_text())


def summarise(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3g} ± {spread:.2g}" if spread else f"{mean:.3g}"


def figure(results, teacher_share, path):
    """High-quality share and modes against the pair count, one line per variant (mean and std over seeds)."""
    toys = list(results)
    fig, axes = plt.subplots(2, len(toys), figsize=(4.2 * len(toys), 5.6), squeeze=False)
    for j, toy in enumerate(toys):
        for i, (key, label) in enumerate((("high_quality", "high-quality share"), ("modes", "modes covered"))):
            ax = axes[i, j]
            for (name, by_count), style in zip(results[toy].items(), ("-", "--")):
                counts = sorted(by_count)
                values = np.array([[m[key] for m in by_count[c]] for c in counts], dtype=float)
                ax.errorbar(counts, values.mean(1), yerr=values.std(1), marker="o", ls=style, capsize=3, label=name)
            if key == "high_quality":
                ax.axhline(statistics.fmean(teacher_share[toy]), color="gray", ls=":", label="teacher, Heun 18")
            else:   # from 0 to every mode
                ax.set_ylim(0, len(mixture_centers(toy)) + 1)
            ax.set(xscale="log", xlabel="regression pairs", ylabel=label, title=f"{toy}: {label}")
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toys", nargs="+", default=["grid25", "ring8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--counts", nargs="+", type=int, default=[32, 128, 512, 2000, 20000])
    parser.add_argument("--out", default="runs/pair_sweep")
    args = parser.parse_args()
    out = Path(args.out)
    results, teacher_share, lines = {}, {}, []
    for toy in args.toys:
        results[toy] = {name: {c: [] for c in args.counts} for name in VARIANTS}
        for seed in args.seeds:
            for count in args.counts:
                for name in VARIANTS:
                    metrics = run(toy, seed, name, count, out)
                    results[toy][name][count].append(metrics["generator"])
            teacher_share.setdefault(toy, []).append(metrics["teacher_heun18"]["high_quality"])
        seeds = f"seeds {', '.join(map(str, args.seeds))}: mean ± std" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
        lines += [f"\n### {toy} ({seeds}; teacher Heun 18: high-quality share {summarise(teacher_share[toy])})\n",
                  "| pairs | variant | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
        lines += [f"| {count} | {name} | " + " | ".join(summarise([m.get(c) for m in results[toy][name][count]])
                                                      for c in COLUMNS) + " |"
                  for count in args.counts for name in VARIANTS]
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    name = "pair_sweep_" + "_".join(args.toys)
    (out / f"{name}.md").write_text(table + "\n")
    figure(results, teacher_share, out / f"{name}.png")
    print(f"\nwrote {out}/{name}.md and {out}/{name}.png")


if __name__ == "__main__":
    main()
