"""benchmarks/fashion_ablations.py end to end on a tiny labelled folder: every variant trained, its table row read
from its own evaluations, the pairs shared between runs of one pair count, the figures written, a rerun reusing all."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from test_monitor import write_folder

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "fashion_ablations.py"
spec = importlib.util.spec_from_file_location("fashion_ablations", SCRIPT)
fashion_ablations = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fashion_ablations)

TINY = ["--teacher-steps", "20", "--teacher-batch", "16", "--model-channels", "8", "--channel-mult", "1,2",
        "--num-pairs", "20", "--pair-steps", "2", "--batch-size", "8", "--dmd-steps", "2", "--log-every", "2",
        "--checkpoint-every", "2", "--sample-every", "2", "--grid-size", "4", "--eval-every", "2", "--eval-num", "16",
        "--device", "cpu"]


def in_table(value):
    """value as the table shows it: to 3 significant digits."""
    return pytest.approx(value, rel=5e-3)


def table_rows(path):
    """{row name: [cells]} of the markdown table in path."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")][1:]   # past the header
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_every_row_finite_pairs_shared_figures_written_and_a_rerun_reuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))   # the classifier is trained into tmp_path
    out = tmp_path / "out"
    argv = ["--dataset", "folder", "--data-dir", write_folder(tmp_path / "shapes.zip", 200), "--out", str(out), *TINY]
    fashion_ablations.main(argv)
    rows = table_rows(out / "table.md")
    names = [*fashion_ablations.TEACHER_ROWS, *(name for name, _ in fashion_ablations.VARIANTS.values())]
    assert list(rows) == names
    for name, (nfe, *scores, seconds) in rows.items():
        steps = int(name.split("Heun ")[1].split()[0]) if "Heun" in name else None
        assert int(nfe) == (2 * steps - 1 if steps else 1)
        assert all(math.isfinite(float(v)) for v in scores)
        assert seconds == "-" if name.startswith("teacher") else float(seconds) > 0
    # the scores are each run's last evaluation and the teacher's cache, from the same noise: at step 0 every
    # generator is the teacher's single step
    teacher = json.loads((out / "teacher_scores.json").read_text())["scores"]
    assert float(rows["teacher, 1 Euler step"][1]) == in_table(teacher["euler1"]["fid"])
    fewer = json.loads((out / "teacher_scores_fewer_steps.json").read_text())
    assert fewer["key"] == json.loads((out / "teacher_scores.json").read_text())["key"]
    for n in fashion_ablations.FEWER_STEPS:
        assert float(rows[f"teacher, Heun {n} steps"][1]) == in_table(fewer["scores"][f"heun{n}"]["fid"])
    for key in fashion_ablations.VARIANTS:   # scored once, before the runs: no run scored the teacher again
        assert (out / key / "teacher_scores.json").read_bytes() == (out / "teacher_scores.json").read_bytes()
        log = [json.loads(line) for line in (out / key / "log.jsonl").read_text().splitlines()]
        evals = [r["eval"] for r in log if "eval" in r]
        assert [r["step"] for r in log if "eval" in r] == [0, 2]
        assert evals[0]["fid"] == pytest.approx(teacher["euler1"]["fid"], rel=1e-4)
        assert float(rows[fashion_ablations.VARIANTS[key][0]][1]) == in_table(evals[-1]["fid"])
    # one pairs folder per pair count, linked into the runs that regress; none for those that do not
    for key, shared in (("dmd", "pairs-20"), ("regression-only", "pairs-20"), ("tenth-pairs", "pairs-2")):
        assert (out / key / "pairs").is_symlink() and (out / key / "pairs").resolve() == (out / shared).resolve()
    assert json.loads((out / "pairs-2" / "manifest.json").read_text())["count"] == 2
    assert not any((out / key / "pairs").exists() for key in ("no-regression", "dmd2"))
    for figure in ("samples.png", "fid.png"):
        assert (out / figure).stat().st_size > 10_000
    # a rerun reuses every finished run, with its measured wall time
    table = (out / "table.md").read_text()
    scored = (out / "teacher_scores_fewer_steps.json").stat().st_mtime_ns
    capsys.readouterr()
    fashion_ablations.main(argv)
    assert capsys.readouterr().out.count("reusing the finished run") == len(fashion_ablations.VARIANTS)
    assert (out / "table.md").read_text() == table
    assert (out / "teacher_scores_fewer_steps.json").stat().st_mtime_ns == scored   # the teacher not scored again
