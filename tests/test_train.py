"""The training loop end to end on toy2d: it learns (where its controls do not), it resumes exactly, the CLIs work
and fail clearly."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from dmd_minimal.checkpoint import load_checkpoint
from dmd_minimal.config import Config, make_config, parse_config
from dmd_minimal.pairs import main as pairs_main
from dmd_minimal.sample import main as sample_main
from dmd_minimal.teacher import get_teacher
from dmd_minimal.train import resolve, train
from dmd_minimal.train import main as train_main
from dmd_minimal.utils import DMDError

TINY = dict(teacher_batch=256, num_pairs=2000, batch_size=256, num_eval=4000, log_every=10)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A grid25 teacher, trained once for the whole module: 4000 steps at batch 256, whose Heun-18 samples
    are 90% high quality (README: 0.899), so that the generator has a distribution worth matching."""
    out = tmp_path_factory.mktemp("teacher")
    get_teacher(resolve(Config(out=str(out), teacher_steps=4000, **TINY)), out)
    return str(out / "teacher.pt")


def toy_metrics(teacher_path, out, **overrides):
    """metrics.json of a toy2d-preset run at batch 256 distilling the module's teacher (seed 0)."""
    train(make_config("toy2d", out=str(out), teacher=teacher_path, **dict(TINY, **overrides)))
    return json.loads((out / "metrics.json").read_text())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)


def test_dmd_beats_regression_alone_where_pairs_are_scarce(teacher_path, tmp_path):
    """32 pairs for 25 modes, where regression alone memorises its pairs and maps fresh noise between the modes,
    and only distribution matching sees fresh samples (README, the pair-count sweep). The same teacher, pairs
    and 300 steps without the distribution-matching loss are the control. High-quality shares over seeds 0-3
    (the toy2d preset at batch 256): DMD 0.305, 0.288, 0.274, 0.224; regression alone 0.099, 0.126, 0.124,
    0.108 (2.1-3.1x less); DMD from 0.05 at the start. Seed 0 with the distribution-matching gradient zeroed:
    0.099 (the control), sign-flipped: 0.002."""
    scarce = dict(num_pairs=32, regression_batch=32, dmd_steps=300)
    dmd = toy_metrics(teacher_path, tmp_path / "dmd", **scarce)
    regression = toy_metrics(teacher_path, tmp_path / "regression", distribution_matching=False, **scarce)
    print(f"start {dmd['teacher_euler1']}\nDMD {dmd['generator']}\nregression alone {regression['generator']}")
    assert dmd["generator"]["high_quality"] > 1.5 * regression["generator"]["high_quality"]
    assert dmd["generator"]["high_quality"] > 3 * dmd["teacher_euler1"]["high_quality"]


def test_distribution_matching_alone_with_dmd2s_rule_moves_towards_the_data(teacher_path, tmp_path):
    """No regression loss: 5 fake-score steps per generator step at rates 10x below the preset (DMD2's two
    time-scale rule, which keeps the modes where one step collapses: README, the collapse study), 100 steps.
    Seeds 0-3: the energy distance fell from 0.12, 0.11, 0.12, 0.11 to 0.045, 0.041, 0.031, 0.046 (0.25-0.43x),
    the high-quality share rose from 0.049, 0.046, 0.047, 0.059 to 0.076, 0.074, 0.068, 0.074 (1.25-1.6x),
    24-25 modes covered. Seed 0 with the gradient zeroed: 0.121 and 0.049 (unchanged), sign-flipped: 18000."""
    metrics = toy_metrics(teacher_path, tmp_path, lambda_reg=0.0, fake_steps_per_generator_step=5, lr=1e-3,
                          fake_lr=5e-4, dmd_steps=100)
    start, after = metrics["teacher_euler1"], metrics["generator"]
    print(f"start {start}\nafter {after}")
    assert after["energy_distance"] < 0.6 * start["energy_distance"]
    assert after["high_quality"] > 1.15 * start["high_quality"] and after["modes"] >= 20
    assert not (tmp_path / "pairs").exists()                  # no regression loss: no pairs to make


def test_real_score_only_collapses(teacher_path, tmp_path):
    """Following the real score alone (the paper's Fig. 3) pulls every sample onto one mode. Seeds 0-3: from 25
    modes, high-quality share 0.05 and energy distance 0.11-0.12 to 1 mode, 0.999 and 2.36-2.39. Seed 0 with
    the gradient zeroed: 25 modes, 0.048 and 0.115; sign-flipped: 0 modes and 4.6e7."""
    train(Config(out=str(tmp_path), teacher=teacher_path, dmd_steps=200, lambda_reg=0.0,
                 real_score_only=True, **TINY))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    start, after = metrics["teacher_euler1"], metrics["generator"]
    assert after["modes"] <= 3 and after["high_quality"] > 0.9 > start["high_quality"]   # on a mode, not between
    assert after["energy_distance"] > 5 * start["energy_distance"]
    assert not (tmp_path / "pairs").exists()                  # no regression loss: no pairs to make


def test_regression_batches_smaller_than_the_batch(teacher_path, tmp_path, monkeypatch):
    """32 pairs against a distribution-matching batch of 256 (--regression-batch 16): each generator step
    regresses 16 pairs, and two steps in a row see all 32; metrics.json reports the copying distances."""
    import dmd_minimal.train as train_module
    seen = []   # (regression batch, its targets y)
    regress = train_module.regression_loss
    monkeypatch.setattr(train_module, "regression_loss", lambda x, y, *a: seen.append((len(x), y)) or regress(x, y, *a))
    dm_batches = []
    dmd_loss = train_module.distribution_matching_loss
    monkeypatch.setattr(train_module, "distribution_matching_loss",
                        lambda x, grad: dm_batches.append(len(x)) or dmd_loss(x, grad))
    train(Config(out=str(tmp_path), teacher=teacher_path, dmd_steps=4, **dict(TINY, num_pairs=32, regression_batch=16,
                                                                              num_eval=100)))
    assert [n for n, _ in seen] == [16] * 4 and dm_batches == [256] * 4
    y_all = torch.cat([y for _, y in seen[:2]])
    assert len(torch.unique(y_all, dim=0)) == 32   # one epoch: every pair once
    generator = json.loads((tmp_path / "metrics.json").read_text())["generator"]
    assert generator["copy_heldout"] > 0 and generator["copy_pairs"] > 0


def test_resume_continues_exactly(teacher_path, tmp_path):
    cfg = Config(teacher=teacher_path, dmd_steps=30, checkpoint_every=10, **dict(TINY, num_eval=100))
    train(dataclasses.replace(cfg, out=str(tmp_path / "straight")))
    train(dataclasses.replace(cfg, out=str(tmp_path / "resumed"), dmd_steps=15))    # stops at step 15
    train(dataclasses.replace(cfg, out=str(tmp_path / "resumed")))                 # picks up from there
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    untimed = lambda history: [{k: v for k, v in h.items() if k != "images_per_s"} for h in history]  # noqa: E731
    assert a["step"] == b["step"] == 30 and untimed(a["history"]) == untimed(b["history"])
    for net in ("generator", "fake_score"):
        for key, value in a[net]["state_dict"].items():
            assert torch.equal(value, b[net]["state_dict"][key]), (net, key)


def test_resume_continues_exactly_under_cosine_decay(teacher_path, tmp_path):
    """The presets decay the learning rates to 0 over --dmd-steps: a run continued from step 4 (--resume) ends
    as the uninterrupted run does, learning rates included. Another --dmd-steps would change the schedule that
    the steps already taken followed: a one-line error."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = make_config("toy2d", teacher=teacher_path, dmd_steps=12, checkpoint_every=4, keep_checkpoints=3,
                      **dict(TINY, num_pairs=256, batch_size=64, log_every=4, num_eval=100))
    assert cfg.cosine_decay
    train(dataclasses.replace(cfg, out=str(straight)))
    train(dataclasses.replace(cfg, out=str(resumed), resume=str(straight / "checkpoint-0000004.pt")))
    a, b = (load_checkpoint(folder / "checkpoint.pt") for folder in (straight, resumed))
    untimed = lambda history: [{k: v for k, v in h.items() if k != "images_per_s"} for h in history]  # noqa: E731
    assert a["step"] == b["step"] == 12 and untimed(a["history"]) == untimed(b["history"])
    assert [h["lr"] for h in b["history"]] == pytest.approx([cfg.lr * 0.5 * (1 + math.cos(math.pi * step / 12))
                                                            for step in (4, 8, 12)])   # after each logged step
    for net in ("generator", "fake_score"):
        for key, value in a[net]["state_dict"].items():
            assert torch.equal(value, b[net]["state_dict"][key]), (net, key)
    with pytest.raises(DMDError) as error:
        train(dataclasses.replace(cfg, out=str(tmp_path / "longer"), resume=str(straight / "checkpoint-0000004.pt"),
                                  dmd_steps=24))
    assert "was made with dmd_steps=12, not 24, and --cosine-decay decays the learning rates to 0 over --dmd-steps: " \
           "resume with --dmd-steps 12" in str(error.value) and "\n" not in str(error.value)


def test_resume_refuses_other_settings(teacher_path, tmp_path):
    cfg = Config(out=str(tmp_path), teacher=teacher_path, dmd_steps=5, **dict(TINY, num_eval=100))
    train(cfg)
    with pytest.raises(Exception, match="lambda_reg=0.25, not 1.0"):
        train(dataclasses.replace(cfg, lambda_reg=1.0))


def test_cli_writes_every_file_and_samples(tmp_path):
    out = tmp_path / "run"
    result = run_cli("dmd_minimal.train", "--toy", "ring8", "--out", str(out), "--teacher-steps", "30",
                     "--dmd-steps", "10", "--num-pairs", "300", "--batch-size", "64", "--teacher-batch", "64",
                     "--log-every", "5", "--num-eval", "2000")
    assert result.returncode == 0, result.stderr
    for name in ("teacher.pt", "pairs/manifest.json", "checkpoint.pt", "log.jsonl", "samples.npz", "metrics.json",
                 "samples.png", "losses.png"):
        assert (out / name).stat().st_size > 0, name
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [5, 10]
    assert np.load(out / "samples.npz")["x"].shape == (2000, 2)
    assert Config().num_eval >= 10_000   # without --num-eval: 10,000 samples
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"teacher_heun18", "teacher_euler1", "generator"}
    assert {"nfe", "energy_distance", "modes", "high_quality", "mode_kl"} <= set(metrics["generator"])

    sample_main(["--checkpoint", str(out / "checkpoint.pt"), "--num", "500", "--out", str(tmp_path / "x.npz")])
    x = np.load(tmp_path / "x.npz")["x"]
    assert x.shape == (500, 2) and np.isfinite(x).all()


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text
    assert "--no-distribution-matching" in text and "--real-score-only" in text


def cli_error(main, argv, capsys):
    """The one line a CLI ends with when it refuses argv (run in-process: no interpreter start-up)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    if isinstance(exit_info.value.code, str):     # sys.exit("error: ...")
        return exit_info.value.code
    return capsys.readouterr().err.strip().splitlines()[-1]   # argparse's usage error


def test_bad_input_gives_one_line_errors(tmp_path, teacher_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    x = str(tmp_path / "x.npz")
    cases = [
        (train_main, ["--dataset", "svhn"], "invalid choice: 'svhn'"),
        (train_main, ["--dataset", "mnist"], "the mnist dataset needs --data-dir DIR with its four IDX files"),
        (train_main, ["--toy", "spiral", "--out", str(tmp_path / "a")], "unknown toy distribution 'spiral'"),
        (train_main, ["--lamda-reg", "1"], "unrecognized arguments: --lamda-reg"),
        (train_main, ["--toy", "ring8", "--teacher", teacher_path, "--out", str(tmp_path / "b")],
         "was trained on toy2d/grid25, not toy2d/ring8"),
        (train_main, ["--teacher", str(corrupt), "--out", str(tmp_path / "c")], "is corrupt"),
        (train_main, ["--no-distribution-matching", "--lambda-reg", "0"], "nothing to train"),
        (sample_main, ["--checkpoint", str(tmp_path / "nope.pt"), "--out", x], "does not exist"),
        (sample_main, ["--checkpoint", str(corrupt), "--out", x], "is corrupt"),
        (sample_main, ["--checkpoint", teacher_path, "--out", x], "lacks"),
    ]
    for main, argv, fragment in cases:
        message = cli_error(main, argv, capsys)
        assert fragment in message and "\n" not in message, (argv, message)
    assert not (tmp_path / "x.npz").exists()


SAMPLE = ["--checkpoint", "missing.pt", "--out", "x.npz"]   # the numbers are checked before the file is read
PAIRS = ["--teacher", "teacher.pt", "--out", "pairs", "--num", "8", "--steps", "18"]   # checked before any file is read
BAD_NUMBERS = [   # (main, argv, the error's text after "error: ")
    *[(train_main, [flag, value], f"{flag} must be {must}, not {value}") for flag, value, must in [
        ("--batch-size", "0", ">= 1"), ("--batch-size", "-64", ">= 1"), ("--dmd-steps", "0", ">= 1"),
        ("--teacher-steps", "0", ">= 1"), ("--checkpoint-every", "0", ">= 1"), ("--log-every", "0", ">= 1"),
        ("--sample-every", "0", ">= 1"), ("--pair-steps", "0", ">= 1"), ("--num-pairs", "0", ">= 1"),
        ("--keep-checkpoints", "0", ">= 1"), ("--max-skipped-steps", "0", ">= 1"), ("--hidden", "0", ">= 1"),
        ("--fake-steps-per-generator-step", "0", ">= 1"), ("--lpips-resolution", "0", ">= 1"),
        ("--num-eval", "0", ">= 2"), ("--num-levels", "1", ">= 2"), ("--seed", "-1", ">= 0"),
        ("--warmup-steps", "-1", ">= 0"), ("--grid-size", "-1", ">= 0"), ("--lambda-reg", "-0.5", ">= 0"),
        ("--weight-decay", "-0.01", ">= 0"), ("--sigma-data", "-1.0", ">= 0"), ("--lr", "nan", "a finite number"),
        ("--lr", "inf", "a finite number"), ("--lr", "0.0", "> 0"), ("--fake-lr", "-0.001", "> 0"),
        ("--teacher-lr", "0.0", "> 0"), ("--grad-clip", "nan", "a finite number"), ("--grad-clip", "0.0", "> 0"),
        ("--sigma-min", "0.0", "> 0"), ("--rho", "0.0", "> 0"), ("--P-std", "0.0", "> 0"),
        ("--P-mean", "nan", "a finite number"), ("--ema", "1.0", "in [0, 1)"), ("--teacher-ema", "-0.1", "in [0, 1)"),
        ("--sigma-max", "0.001", "> --sigma-min 0.002"),
        ("--dm-max-level", "1000", "in [--dm-min-level 20, --num-levels 1000)"),
        ("--eval-every", "-1", ">= 0"), ("--num-blocks", "-1", ">= 0"), ("--teacher-ema-rampup", "-0.05", ">= 0"),
        ("--channel-mult", "1,x", "integers like 1,2,2"), ("--regression-batch", "-1", ">= 0"),
    ]],
    (train_main, ["--num-pairs", "32", "--regression-batch", "64"],
     "--num-pairs 32 is smaller than one regression batch (--regression-batch 64)"),
    (train_main, ["--num-pairs", "32"], "--num-pairs 32 is smaller than one regression batch (--batch-size 512)"),
    (train_main, ["--eval-every", "5", "--eval-num", "3"], "--eval-num must be >= 4 with --eval-every, not 3"),
    (train_main, ["--dm-min-level", "-1"], "--dm-min-level must be >= 0, not -1"),
    (train_main, ["--dm-min-level", "990"],
     "--dm-max-level must be in [--dm-min-level 990, --num-levels 1000), not 980"),
    (train_main, ["--dataset", "shapes", "--resolution", "0"], "--resolution must be >= 1 for shapes, not 0"),
    (train_main, ["--dataset", "shapes", "--sigma-data", "0"], "--sigma-data must be > 0 for shapes, not 0.0"),
    (train_main, ["--device", "tpu"], "--device 'tpu' is not a device: use cpu, cuda or cuda:N"),
    (train_main, ["--device", "cuda"], "--device cuda: this machine has 0 CUDA GPU(s) that torch can use"),
    (train_main, ["--device", "meta"], "--device meta: dmd_minimal runs on cpu, cuda or cuda:N"),
    (sample_main, SAMPLE + ["--num", "-5"], "--num must be >= 1, not -5"),
    (sample_main, SAMPLE + ["--num", "0"], "--num must be >= 1, not 0"),
    (sample_main, SAMPLE + ["--batch-size", "0"], "--batch-size must be >= 1, not 0"),
    (sample_main, SAMPLE + ["--teacher-steps", "-1"], "--teacher-steps must be >= 0, not -1"),
    (sample_main, SAMPLE + ["--seed", "-1"], "--seed must be >= 0, not -1"),
    (sample_main, SAMPLE + ["--device", "tpu"], "--device 'tpu' is not a device"),
    (sample_main, SAMPLE + ["--device", "cuda:0"], "--device cuda:0: this machine has 0 CUDA GPU(s)"),
    *[(pairs_main, PAIRS + [flag, value], f"{flag} must be {must}, not {value}") for flag, value, must in [
        ("--steps", "0", ">= 1"), ("--num", "-5", ">= 1"), ("--batch-size", "0", ">= 1"), ("--shard-size", "0", ">= 1"),
        ("--seed", "-1", ">= 0"), ("--rho", "nan", "> 0"), ("--sigma-max", "0.001", "> --sigma-min 0.002")]],
    (pairs_main, PAIRS + ["--device", "cuda"], "--device cuda: this machine has 0 CUDA GPU(s)"),
]


@pytest.mark.parametrize("main, argv, expected", BAD_NUMBERS, ids=[" ".join(case[1][-2:]) for case in BAD_NUMBERS])
def test_numbers_and_devices_out_of_range_are_one_line_errors(main, argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # a machine without CUDA, here or on a GPU
    message = cli_error(main, ["--out", "run"] + argv if main is train_main else argv, capsys)
    assert message.startswith("error: " + expected) and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []   # refused before any work


def test_flags_override_the_preset():
    cfg = parse_config(["--toy", "ring8", "--no-distribution-matching", "--lambda-reg", "1"])
    assert (cfg.toy, cfg.distribution_matching, cfg.lambda_reg, cfg.dataset) == ("ring8", False, 1.0, "toy2d")


def test_ctrl_c_saves_a_checkpoint_that_resumes(teacher_path, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--teacher", teacher_path, "--out", str(out), "--checkpoint-every", "100000", "--num-pairs", "200",
            "--batch-size", "32", "--num-eval", "100", "--no-cosine-decay"]   # resumed with fewer --dmd-steps

    def press_ctrl_c():   # a second after the DMD loop started its log, as a user at the keyboard would
        while not (out / "log.jsonl").exists():
            time.sleep(0.05)
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    last = cli_error(train_main, argv + ["--dmd-steps", "100000"], capsys)
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert last == f"error: interrupted (SIGINT): saved {out / 'checkpoint.pt'} at step {step}; rerun the same command to resume"
    assert 0 < step < 100000
    train_main(argv + ["--dmd-steps", str(step + 2)])   # resumes there
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step + 2
    assert f"resuming {out / 'checkpoint.pt'} at step {step}" in capsys.readouterr().out
