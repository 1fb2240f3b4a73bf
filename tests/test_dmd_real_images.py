"""DMD improves real images: Fashion-MNIST's real files, small enough for the default suite.

6000 train images, downsampled to 14x14, go through the whole pipeline as a user's labelled folder: a
teacher trained here, its Heun-18 pairs, DMD, and FID in a classifier's features during training. The
one-step generator must beat the teacher's own one step by far, without losing the recall of its ODE.
DMD's settings are the fashion-mnist preset's (batch 32, fake lr 1e-3, cosine decay) with a generator lr
of 2e-4 for the short run. Measured (1000 samples, FID in the classifier's features / recall): teacher
Heun 18 15.3 / 0.80, 1 Euler step 94.0 / 0.00; the generator at steps 100, 200, 300, 400: 34.3 / 0.25,
27.7 / 0.39, 22.7 / 0.42, 24.1 / 0.46 (lr 1e-4: 0.38 at step 400 with 500 pairs, 0.50 at step 800).

Regression alone would pass that test too: at this scale it beats DMD (the same teacher, pairs and 400
steps: 21.7 / 0.63; with 100 pairs 21.4 / 0.66 against DMD's 23.9 / 0.43, with 16 pairs 23.8 / 0.62
against 22.5 / 0.45), so it cannot be the control that a broken distribution-matching term fails. Distribution
matching alone (--lambda-reg 0, the same teacher and steps) is: only it can move the generator there, and
it must also halve the one-step FID and lift recall from 0 to a quarter of the ODE's. Measured: 26.5 / 0.27
(with the DMD seed 1 on the same teacher: 26.6 / 0.38); with the distribution-matching gradient zeroed it
stays at 94.2 / 0.00 (while DMD becomes regression alone, 21.7 / 0.63, and passes), sign-flipped 222 / 0.
"""
import dataclasses
import io
import json
import os
import shutil
import zipfile

import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from dmd_minimal.config import make_config
from dmd_minimal.data import load_dataset
from dmd_minimal.mnist import DEBIAN_FOLDERS
from dmd_minimal.train import train

REAL = DEBIAN_FOLDERS["fashion-mnist"]
pytestmark = pytest.mark.skipif(not os.path.isdir(REAL), reason=f"Fashion-MNIST is not installed in {REAL} "
                                                                "(apt-get install dataset-fashion-mnist)")


def write_small_fashion_mnist(path, num=6000):
    """The first `num` train images, 2x2-averaged to 14x14, as an EDM zip with their labels."""
    data = load_dataset("fashion-mnist")
    small = F.avg_pool2d(data.images[:num].float(), 2).round().to(torch.uint8)   # [num, 1, 14, 14]
    labels = []
    with zipfile.ZipFile(path, "w") as z:
        for i, image in enumerate(small[:, 0].numpy()):
            out = io.BytesIO()
            PIL.Image.fromarray(image).save(out, format="PNG")
            labels.append([f"img{i:05d}.png", int(data.labels[i])])
            z.writestr(labels[-1][0], out.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": labels}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The final scores of DMD, of distribution matching alone (the same teacher, noise and steps, no regression
    loss) and of the teacher."""
    tmp = tmp_path_factory.mktemp("fm14")
    write_small_fashion_mnist(tmp / "fm14.zip")
    cfg = make_config("folder", data_dir=str(tmp / "fm14.zip"), out=str(tmp / "dmd"), device="cpu",
                      model_channels=16, channel_mult="1,2", num_blocks=1, xflip=True,
                      teacher_steps=500, teacher_batch=64, teacher_lr=2e-3, teacher_ema_rampup=0.05,
                      num_pairs=1000, pair_steps=18, batch_size=32, dmd_steps=400, lr=2e-4, fake_lr=1e-3,
                      cosine_decay=True, eval_every=400, eval_num=1000, log_every=50, checkpoint_every=1000,
                      grid_size=0)
    alone = dataclasses.replace(cfg, out=str(tmp / "dm_alone"), teacher=str(tmp / "dmd" / "teacher.pt"), lambda_reg=0.0)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("DMD_CACHE", str(tmp / "cache"))
        train(cfg)
        (tmp / "dm_alone").mkdir()
        shutil.copy(tmp / "dmd" / "teacher_scores.json", tmp / "dm_alone")   # the same teacher and noise
        train(alone)
    scores = {name: [json.loads(line)["eval"] for line in (tmp / name / "log.jsonl").read_text().splitlines()
                     if "eval" in json.loads(line)][-1] for name in ("dmd", "dm_alone")}
    return dict(scores, teacher=json.loads((tmp / "dmd" / "teacher_scores.json").read_text())["scores"])


@pytest.mark.parametrize("name, recall", [("dmd", 0.5), ("dm_alone", 0.25)])
def test_one_step_generator_beats_the_teachers_one_step_and_keeps_recall(runs, name, recall):
    generator, teacher = runs[name], runs["teacher"]
    print(f"{name} {generator}\nteacher Heun 18 {teacher['heun18']}\nteacher 1 Euler step {teacher['euler1']}")
    assert generator["num_samples"] == teacher["euler1"]["num_samples"] == 1000   # the same noise and count
    assert generator["fid"] <= 0.5 * teacher["euler1"]["fid"]
    assert generator["recall"] >= recall * teacher["heun18"]["recall"]
