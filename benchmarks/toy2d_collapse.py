"""Why distribution matching without regression collapses on the toys, and what each candidate fix gave.

    python benchmarks/toy2d_collapse.py                    # grid25 and ring8, seed 0
    python benchmarks/toy2d_collapse.py --toys grid25 --dmd-steps 500

All variants train with --lambda-reg 0 (distribution matching alone) and distil one teacher per toy
(the toy2d preset's, trained in --out/<toy>/teacher):
- "DM only": the preset.
- "DM only, exact real score": mu_real from the closed-form mixture denoiser (toy2d.exact_denoiser)
  in place of the trained teacher, to separate the teacher's error from the method's.
- "DM only, DMD2 rule": 5 fake-score steps per generator step (arXiv 2405.14867) and 10x lower
  learning rates than the preset's (lr 1e-3, fake lr 5e-4).
- "DM only, lower learning rates": the same rates with one fake-score step, to tell the two apart.
- "DM only, spread start": the generator starts from a regression-only run of --start-steps steps,
  which already covers the modes, instead of the teacher's one-step prediction.
Then `report.expected_push` measures the claim: at a point mass every sample x = G(z) is the same point, so the DMD
gradient can differ between samples only through the noise n of x_t = x + sigma n, which does not
depend on z; its mean over noise, E_n[grad | z], is the same for every z and can move the point but not
split it. Near a point mass, the script fits E_n[grad | z] as slope * (x - centre), at small and at
large sigma: only the large sigmas see the other modes.
"""
import argparse
import json
from pathlib import Path

import torch

import dmd_minimal.train as training
from dmd_minimal.config import make_config
from dmd_minimal.load import load_denoiser
from dmd_minimal.report import expected_push
from dmd_minimal.sample import load_generator
from dmd_minimal.toy2d import exact_denoiser

VARIANTS = {   # name: config overrides
    "DM only": dict(lambda_reg=0.0),
    "DM only, exact real score": dict(lambda_reg=0.0),
    "DM only, DMD2 rule": dict(lambda_reg=0.0, fake_steps_per_generator_step=5, lr=1e-3, fake_lr=5e-4),
    "DM only, lower learning rates": dict(lambda_reg=0.0, lr=1e-3, fake_lr=5e-4),   # the rule's rates, 1 fake step
    "DM only, spread start": dict(lambda_reg=0.0),
}


def real_score_swapped(real_score):
    """training.dmd_gradient with mu_real from real_score instead of the teacher (restore dmd_gradient after)."""
    dmd_gradient = training.dmd_gradient
    return lambda x, sigma, teacher, fake_score, labels=None, real_only=False, noise=None: dmd_gradient(
        x, sigma, real_score, fake_score, labels, real_only, noise)


def generator_from(checkpoint):
    """training.build_dmd whose generator starts from the generator in `checkpoint` (restore build_dmd after)."""
    build_dmd = training.build_dmd

    def build(cfg, teacher, lpips=None):
        nets, parts = build_dmd(cfg, teacher, lpips)
        start = load_denoiser(checkpoint, "generator")
        training.dist.unwrap(nets["generator"]).denoiser.load_state_dict(start.state_dict())
        return nets, parts
    return build


def run(toy, seed, name, out, dmd_steps, start_steps):
    """metrics.json of one variant (trained unless its folder holds one)."""
    root = out / toy
    teacher = root / "teacher" / "teacher.pt"
    if not teacher.exists():
        training.train(make_config("toy2d", toy=toy, seed=seed, out=str(teacher.parent), stage="teacher"))
    folder = root / name.replace(", ", "-").replace(" ", "_")
    extra = dict(dmd_steps=dmd_steps) if dmd_steps else {}
    cfg = make_config("toy2d", toy=toy, seed=seed, out=str(folder), teacher=str(teacher), **extra, **VARIANTS[name])
    if (folder / "metrics.json").exists():
        return json.loads((folder / "metrics.json").read_text()), folder
    saved = training.dmd_gradient, training.build_dmd
    try:
        if name == "DM only, exact real score":
            training.dmd_gradient = real_score_swapped(exact_denoiser(toy))
        if name == "DM only, spread start":
            start = root / "regression_start"
            if not (start / "checkpoint.pt").exists():
                training.train(make_config("toy2d", toy=toy, seed=seed, out=str(start), teacher=str(teacher),
                                           distribution_matching=False, dmd_steps=start_steps))
            training.build_dmd = generator_from(start / "checkpoint.pt")
        torch.manual_seed(seed)
        training.train(cfg)
    finally:
        training.dmd_gradient, training.build_dmd = saved
    return json.loads((folder / "metrics.json").read_text()), folder


def push(checkpoint, real_score=None, seed=0):
    """report.expected_push of the run's final generator and fake score at 256 z (real_score: mu_real's
    denoiser, default the run's teacher)."""
    teacher, fake_score = real_score or load_denoiser(checkpoint), load_denoiser(checkpoint, "fake_score")
    generator = load_generator(checkpoint)[0]
    torch.manual_seed(seed)   # z and the noise draws
    return expected_push(generator, teacher, fake_score, torch.randn(256, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toys", nargs="+", default=["grid25", "ring8"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dmd-steps", type=int, default=0, help="override the preset's DMD steps (0: keep)")
    parser.add_argument("--start-steps", type=int, default=500, help="regression steps of the spread start")
    parser.add_argument("--out", default="runs/collapse")
    args = parser.parse_args()
    out = Path(args.out)
    lines = ["| toy | variant | modes | high_quality | mode_kl | energy_distance | sample std | "
             "mean push, small sigma | slope, small sigma | mean push, large sigma | slope, large sigma |",
             "|---" * 11 + "|"]
    for toy in args.toys:
        for name in VARIANTS:
            metrics, folder = run(toy, args.seed, name, out, args.dmd_steps, args.start_steps)
            exact = exact_denoiser(toy) if name == "DM only, exact real score" else None
            g, p = metrics["generator"], push(folder / "checkpoint.pt", exact, seed=args.seed)
            cells = [g["modes"], g["high_quality"], g["mode_kl"], g["energy_distance"], *p.values()]
            lines.append(f"| {toy} | {name} | " + " | ".join(f"{v:.3g}" for v in cells) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
