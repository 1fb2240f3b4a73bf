"""The paper's Table 2 on real images: which parts of DMD matter, distilling one Fashion-MNIST teacher.

    python benchmarks/fashion_ablations.py                                   # every variant, the preset's budget
    python benchmarks/fashion_ablations.py --teacher runs/fm/teacher.pt --variants dmd dmd2 --dmd-steps 1000
    python benchmarks/fashion_ablations.py --dmd-steps 4 --eval-every 2 --eval-num 100 --num-pairs 64 --out /tmp/fa

One teacher (--teacher, or the preset's trained once into OUT/teacher) is distilled by each variant below
with the same budget. Every variant is an ordinary `train(cfg)` folder OUT/<variant>, so a rerun reuses
what is finished and resumes what was interrupted; any other flag of `python -m dmd_minimal.train`
(--dmd-steps, --eval-every, --eval-num, --seed, --batch-size, --num-pairs, ...) applies to every run.
Runs with the same pair count share one pairs folder, OUT/pairs-<count>, linked as OUT/<variant>/pairs
(train() checks its manifest as for any pairs folder). The scores are each run's last evaluation
(monitor.py: --eval-num samples from fixed noise and balanced labels, in log.jsonl), the teacher's from
the same noise (Heun 18, 9, 6 and 4 steps and one Euler step, computed once before the runs and cached: the
fewer steps show what NFE one DMD step is worth). Prints a markdown table and writes it into OUT/table.md,
with samples.png (one row per model, the same noise and labels) and fid.png (FID against the step).
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dmd_minimal.config import build_parser, make_config, regression_batch
from dmd_minimal.data import CLASS_NAMES
from dmd_minimal.load import load_denoiser
from dmd_minimal.monitor import TEACHER_STEPS, Monitor, cached_scores
from dmd_minimal.networks import sample_shape
from dmd_minimal.plots import sample_panels, step_curves
from dmd_minimal.report import grid_noise
from dmd_minimal.sample import load_generator
from dmd_minimal.sampler import sample_ode
from dmd_minimal.train import AMP_DTYPES, resolve, train
from dmd_minimal.utils import DMDError, atomic_write, check_option

VARIANTS = {   # --variants name: (table row, what it changes in the config; DMD.md §4-6, DMD2 = arXiv 2405.14867)
    "dmd": ("DMD", lambda cfg: {}),
    "no-regression": ("DMD without regression", lambda cfg: dict(lambda_reg=0.0)),
    "regression-only": ("regression only", lambda cfg: dict(distribution_matching=False)),
    "dmd2": ("DMD2 option (5 fake-score steps, no regression)",
             lambda cfg: dict(fake_steps_per_generator_step=5, lambda_reg=0.0)),
    "tenth-pairs": ("DMD with a tenth of the pairs", lambda cfg: dict(num_pairs=max(cfg.num_pairs // 10, 1))),
}
FEWER_STEPS = (9, 6, 4)   # the teacher's ODE with fewer Heun steps: what NFE one DMD step is worth
TEACHER_ROWS = {   # table row: (key in the teacher's scores, NFE)
    **{f"teacher, Heun {n} steps": (f"heun{n}", 2 * n - 1) for n in (TEACHER_STEPS, *FEWER_STEPS)},
    "teacher, 1 Euler step": ("euler1", 1),
}
COLUMNS = ("fid", "precision", "recall", "class_accuracy")


def get_teacher_path(base, out):
    """--teacher, or the preset's teacher trained once into OUT/teacher (reused when it is there)."""
    if base.teacher:
        return base.teacher
    train(dataclasses.replace(base, out=str(out / "teacher"), stage="teacher"))
    return str(out / "teacher" / "teacher.pt")


def link_pairs(folder, out, count):
    """OUT/<variant>/pairs -> OUT/pairs-<count>: one pairs folder for every run with this pair count."""
    shared = out / f"pairs-{count}"
    shared.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(folder / "pairs"):
        (folder / "pairs").symlink_to(os.path.relpath(shared, folder))


def score_teacher(base, teacher_path, out):
    """The teacher's scores from the runs' noise: {'heun18', 'euler1'} by monitor.Monitor, which caches them in
    OUT/teacher_scores.json (each run's own Monitor finds them there, copied into its folder), and
    {'heun9', ...} (FEWER_STEPS) here, cached in OUT/teacher_scores_fewer_steps.json under the same key."""
    cfg = resolve(dataclasses.replace(base, out=str(out)))
    teacher = load_denoiser(teacher_path).to(cfg.device)
    teacher.amp_dtype = AMP_DTYPES[cfg.precision]   # as in the runs
    monitor = Monitor(cfg, teacher, out)
    if monitor.scorer is None:
        raise DMDError(f"no score for {cfg.dataset} here (the notice above says why)")
    heun = lambda n: lambda z, y: sample_ode(teacher, z, n, y, **monitor.ode)   # noqa: E731
    fewer = cached_scores(out / "teacher_scores_fewer_steps.json", monitor.teacher_key,
                          lambda: {f"heun{n}": monitor.score(heun(n)) for n in FEWER_STEPS})
    return {**monitor.teacher_scores, **fewer}


def run_variant(cfg, out):
    """Train cfg into its folder unless wall_time.json says this very config finished there; returns the seconds.

    The pairs are made first (once per pair count) and the teacher's scores copied in, so that the time is the
    DMD stage's alone: its steps and its evaluations.
    """
    folder = Path(cfg.out)
    record_path = folder / "wall_time.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else dict(seconds=0.0, config=None)
    if record["config"] == dataclasses.asdict(cfg):
        print(f"reusing the finished run in {folder}")
        return record["seconds"]
    if cfg.lambda_reg > 0:
        link_pairs(folder, out, cfg.num_pairs)
        train(dataclasses.replace(cfg, stage="pairs"))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "teacher_scores.json", folder / "teacher_scores.json")   # its Monitor checks the key
    start, finished = time.perf_counter(), False
    try:
        train(cfg)
        finished = True
    finally:   # an interrupted run adds its time to what the resumed one will take
        record = dict(seconds=record["seconds"] + time.perf_counter() - start,
                      config=dataclasses.asdict(cfg) if finished else None)
        atomic_write(record_path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    return record["seconds"]


def evaluations(cfg):
    """A run's evaluations {'step', **scores} from its log.jsonl, checked to end with cfg.eval_num samples at the
    last step."""
    log = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    evals = [dict(step=r["step"], **r["eval"]) for r in log if "eval" in r]
    if not evals or evals[-1]["step"] != cfg.dmd_steps or evals[-1]["num_samples"] != cfg.eval_num:
        raise DMDError(f"{cfg.out}/log.jsonl does not end with an evaluation of {cfg.eval_num} samples at step "
                       f"{cfg.dmd_steps}: delete {cfg.out} to run it again with these settings")
    return evals


def markdown_table(rows, metric, eval_num):
    """rows: {row name: (NFE, scores, seconds or None)} as a markdown table."""
    cell = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)   # noqa: E731
    header = ("samples", "NFE", metric, "precision", "recall", "class accuracy", "wall time (s)")
    lines = [f"{eval_num} samples per row, the same noise and balanced labels; wall time: the DMD stage of each run "
             f"(its pairs made beforehand), evaluations included\n",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += [f"| {name} | {nfe} | " + " | ".join(cell(scores.get(c)) for c in COLUMNS) + f" | {'-' if seconds is None else f'{seconds:.0f}'} |"
              for name, (nfe, scores, seconds) in rows.items()]
    return "\n".join(lines)


def samples_figure(teacher_path, runs, cfg, path, num=20):
    """samples.png: the teacher's ODE and single step, then each run's one-step generator, a row each, all from
    the same noise and labels (every class in turn)."""
    teacher = load_denoiser(teacher_path)
    z, labels = grid_noise(num, sample_shape(teacher), teacher.label_dim, cfg.seed + 1, "cpu")
    ode = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
    rows = {f"teacher, Heun {TEACHER_STEPS} steps ({2 * TEACHER_STEPS - 1} NFE)":
            sample_ode(teacher, z, TEACHER_STEPS, labels, **ode),
            "teacher, 1 Euler step (1 NFE)": sample_ode(teacher, z, 1, labels, solver="euler", **ode)}
    with torch.no_grad():
        for name, run in runs.items():
            rows[name] = load_generator(Path(run.out) / "checkpoint.pt")[0](z, labels)
    names = CLASS_NAMES.get(cfg.dataset) or [f"class {k}" for k in range(teacher.label_dim)]
    columns = [names[k] for k in labels.tolist()] if labels is not None else None
    title = "the same noise and labels in every row; the DMD variants' one-step generators (1 NFE)"
    sample_panels({title: torch.cat(list(rows.values()))}, num, list(rows), path, columns)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Any other flag of python -m dmd_minimal.train sets that field for every "
                                            "run (and the teacher trained here), e.g. --dmd-steps, --eval-every, "
                                            "--eval-num, --seed, --batch-size, --num-pairs, --data-dir.")
    parser.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist", "folder"),
                        help="labelled data, scored in a classifier's features (default fashion-mnist)")
    parser.add_argument("--teacher", default="",
                        help="teacher to distil (default: the preset's, trained into OUT/teacher)")
    parser.add_argument("--out", default="runs/fashion_ablations", help="one folder per variant, the table and figures")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                        help=f"the variants to run, of {', '.join(VARIANTS)} (default: all)")
    args, rest = parser.parse_known_args(argv)
    train_flags = build_parser()
    train_flags.prog = parser.prog   # a typo's error names this script
    out = Path(args.out)
    try:
        base = make_config(args.dataset, **vars(train_flags.parse_args(rest)), teacher=args.teacher)
        check_option(base.eval_every > 0, "--eval-every", base.eval_every, "> 0: the scores are the runs' evaluations")
        teacher_path = get_teacher_path(base, out)
        teacher = score_teacher(base, teacher_path, out)
        runs, seconds = {}, {}
        for key in args.variants:
            name, changes = VARIANTS[key]
            cfg = dataclasses.replace(base, out=str(out / key), teacher=teacher_path, **changes(base))
            if cfg.lambda_reg > 0 and cfg.num_pairs < regression_batch(cfg):   # a tenth of 64 pairs: batches of 6
                cfg = dataclasses.replace(cfg, regression_batch=cfg.num_pairs)
            seconds[name] = run_variant(cfg, out)
            runs[name] = cfg
        evals = {name: evaluations(cfg) for name, cfg in runs.items()}
    except DMDError as e:
        sys.exit(f"error: {e}")
    rows = {name: (nfe, teacher[key], None) for name, (key, nfe) in TEACHER_ROWS.items()}
    rows.update({name: (1, evals[name][-1], seconds[name]) for name in runs})
    metric = teacher[f"heun{TEACHER_STEPS}"]["metric"]
    metric = f"{metric} (not Inception FID)" if "classifier" in metric else metric
    table = markdown_table(rows, metric, base.eval_num)
    print(table)
    (out / "table.md").write_text(table + "\n")
    samples_figure(teacher_path, runs, base, out / "samples.png")
    step_curves({name: ([e["step"] for e in es], [e["fid"] for e in es]) for name, es in evals.items()},
                {f"{name} ({nfe} NFE): {teacher[key]['fid']:.3g}": teacher[key]["fid"]
                 for name, (key, nfe) in TEACHER_ROWS.items()},
                out / "fid.png", title=f"{metric}, {base.eval_num} samples", ylabel="FID")
    print(f"\nwrote {out}/table.md, {out}/samples.png and {out}/fid.png")


if __name__ == "__main__":
    main()
