"""FID during training (monitor.py) and a user's own images (--dataset folder) through the whole pipeline:
a labelled 3-channel folder scored in a classifier's features, an unlabelled 1-channel one without a metric."""
import json
import zipfile

import numpy as np
import pytest
import torch

from dmd_minimal.config import make_config
from dmd_minimal.data import Shapes
from dmd_minimal.networks import sample_shape
from dmd_minimal.train import train

from test_data import png_bytes


def write_folder(path, num, gray=False, labelled=True):
    """An EDM-style zip of `shapes` images at 16x16 (labels: the shape), RGB or gray."""
    shapes = Shapes(resolution=16, size=num, seed=3)
    names, labels = [], []
    with zipfile.ZipFile(path, "w") as z:
        for i in range(num):
            x, y = shapes[i]
            image = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()   # [H, W, 3]
            image = image.mean(2).astype(np.uint8) if gray else image
            names.append(f"00000/img{i:08d}.png")
            labels.append([names[-1], int(y)])
            z.writestr(names[-1], png_bytes(image))
        z.writestr("dataset.json", json.dumps({"labels": labels if labelled else None}))
    return str(path)


def tiny_folder_run(data, out, **overrides):
    """A teacher trained here on the folder, its pairs and a few DMD steps, scored every 2 steps."""
    return make_config("folder", **{**dict(data_dir=data, out=str(out), device="cpu", teacher_steps=20,
                                           teacher_batch=16, model_channels=8, channel_mult="1,2", num_pairs=16,
                                           pair_steps=2, batch_size=8, dmd_steps=4, log_every=2, checkpoint_every=2,
                                           sample_every=2, grid_size=4, eval_every=2, eval_num=16), **overrides})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))   # the classifier is trained into tmp_path


def test_eval_every_writes_records_curves_and_cached_teacher_scores(tmp_path, capsys):
    data = write_folder(tmp_path / "shapes.zip", 200)
    generator = train(tiny_folder_run(data, tmp_path / "run"))
    assert tuple(sample_shape(generator.denoiser)) == (3, 16, 16) and generator.denoiser.label_dim == 4
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert r["eval"]["metric"] == "FID in the classifier's features" and r["eval"]["num_samples"] == 16
        assert r["eval"]["fid"] > 0 and 0 <= r["eval"]["precision"] <= 1 and 0 <= r["eval"]["recall"] <= 1
        assert 0 <= r["eval"]["class_accuracy"] <= 1
    assert "not Inception FID" in capsys.readouterr().out
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "samples.png").exists()
    teacher_scores = json.loads((tmp_path / "run" / "teacher_scores.json").read_text())
    assert set(teacher_scores["scores"]) == {"heun18", "euler1"}
    # the generator starts as the teacher's one-step prediction: its step-0 score is the teacher's 1 Euler step
    assert evals[0]["eval"]["fid"] == pytest.approx(teacher_scores["scores"]["euler1"]["fid"], rel=1e-4)
    # resumed with more steps: the teacher is scored from the cache, the log keeps the earlier evaluations
    stamp = (tmp_path / "run" / "teacher_scores.json").stat().st_mtime_ns
    train(tiny_folder_run(data, tmp_path / "run", dmd_steps=6))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [0, 2, 4, 6]
    assert (tmp_path / "run" / "teacher_scores.json").stat().st_mtime_ns == stamp


def test_gray_unlabelled_folder_runs_without_a_metric(tmp_path, capsys):
    """Nothing assumes RGB: 1-channel images through the teacher, the pairs, DMD and the grids. No labels and
    no Inception weights here: FID during training is off with a one-line notice, not a failure."""
    data = write_folder(tmp_path / "gray.zip", 40, gray=True, labelled=False)
    generator = train(tiny_folder_run(data, tmp_path / "run"))
    assert tuple(sample_shape(generator.denoiser)) == (1, 16, 16) and generator.denoiser.label_dim == 0
    out = capsys.readouterr().out
    assert "notice: FID during training is off" in out and len([line for line in out.splitlines()
                                                                if "notice" in line]) == 1
    assert (tmp_path / "run" / "samples.png").exists() and not (tmp_path / "run" / "curves.png").exists()
