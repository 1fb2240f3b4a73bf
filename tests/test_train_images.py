"""The image pipeline on 8x8 images: DMD steps, exact resume, LPIPS, precision, stages and one-line errors."""
import dataclasses
import hashlib
import json
import math
import urllib.error
import warnings

import pytest
import torch

from dmd_minimal.checkpoint import load_checkpoint
from dmd_minimal.config import make_config
from dmd_minimal.dmd_loss import regression_loss, sigma_levels
from dmd_minimal.generator import OneStepGenerator
from dmd_minimal.load import load_denoiser
from dmd_minimal.networks import build_denoiser, denoiser_to_dict
from dmd_minimal.songunet import SongUNet
from dmd_minimal.teacher import ema_decay, xflip
from dmd_minimal.train import generator_step, step_optimizer, train, trainable_copy
from dmd_minimal.train import main as train_main
from dmd_minimal.utils import DMDError, atomic_save


def tiny_teacher(path, channels=3, label_dim=4, resolution=8):
    """An untrained 8x8 SongUNet (with EDM's unused augmentation input), its weights jittered so that F is not 0."""
    torch.manual_seed(0)
    teacher = build_denoiser("songunet", 0.5, label_dim, img_resolution=resolution, in_channels=channels,
                             out_channels=channels, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                             attn_resolutions=[4], dropout=0.0, augment_dim=9)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    atomic_save(dict(denoiser=denoiser_to_dict(teacher)), path)
    return str(path)


def tiny(out, teacher, **overrides):
    """The shapes preset at 8x8 with a handful of steps, pairs and grid images."""
    return make_config("shapes", **{**dict(resolution=8, teacher=teacher, out=str(out), device="cpu", num_pairs=16,
                                           pair_steps=2, batch_size=8, dmd_steps=4, log_every=2, checkpoint_every=2,
                                           sample_every=2, grid_size=4), **overrides})


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="module")
def straight_run(teacher_file, tmp_path_factory):
    """Four DMD steps with the full loss (distribution matching, regression, fake score) and an EMA."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny(out, teacher_file, ema=0.5))
    return out


def assert_same(a, b, where=""):
    """Exact equality of nested dicts / lists of tensors and numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_dmd_steps_write_every_file(straight_run, teacher_file):
    out = straight_run
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["step"] == 4 and saved["skipped"] == dict(generator=0, fake_score=0)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(math.isfinite(r[k]) for r in log
                                                      for k in ("loss_dm", "loss_reg", "loss_fake"))
    names = sorted(p.name for p in out.iterdir())
    assert names == [".lock", "checkpoint-0000002.pt", "checkpoint.pt", "grids", "log.jsonl", "pairs", "samples.png"]
    assert load_checkpoint(out / "checkpoint-0000002.pt")["step"] == 2   # the one before: damage to one spares the other
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["0000000.png", "0000002.png", "0000004.png",
                                                                 "teacher.png"]
    teacher = torch.load(teacher_file, weights_only=True)["denoiser"]["state_dict"]
    moved = [k for k, v in saved["generator"]["state_dict"].items() if not torch.equal(v, teacher[k])]
    assert len(moved) > 10 and not any("map_augment" in k for k in moved)   # EDM's augmentation input: frozen


def test_resume_continues_exactly(straight_run, teacher_file, tmp_path):
    cfg = tiny(tmp_path, teacher_file, ema=0.5)
    train(dataclasses.replace(cfg, dmd_steps=2))   # stops at step 2
    train(cfg)                                      # a rerun resumes OUT/checkpoint.pt
    a, b = load_checkpoint(straight_run / "checkpoint.pt"), load_checkpoint(tmp_path / "checkpoint.pt")
    for part in ("generator", "fake_score", "generator_ema", "optimizers", "schedules", "pending", "skipped"):
        assert_same(a[part], b[part], part)
    untimed = lambda history: [{k: v for k, v in h.items() if k != "images_per_s"} for h in history]  # noqa: E731
    assert untimed(a["history"]) == untimed(b["history"])
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 2
    # --resume names a checkpoint: continuing step 2 of the straight run elsewhere gives its step 4 too
    train(dataclasses.replace(cfg, out=str(tmp_path / "other"), resume=str(straight_run / "checkpoint-0000002.pt")))
    assert_same(a["generator"], load_checkpoint(tmp_path / "other" / "checkpoint.pt")["generator"])


@pytest.fixture(scope="module")
def random_lpips():
    lpips = pytest.importorskip("lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # torchvision's notice about pretrained=
        # linear layers from the lpips package, VGG16 randomly initialised: nothing to download
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    return net.eval().requires_grad_(False)


def bilinear_oracle(a, b, c, size, out):
    """a i + b j + c on a size x size grid [1, 1, size, size], and its bilinear upsampling to out x out in closed
    form: bilinear interpolation keeps an affine image affine, with output pixel k at source coordinate
    (k + 0.5) size / out - 0.5 (pixel centres; align_corners=False), clamped to the image's edge."""
    i = torch.arange(size, dtype=torch.float64)
    u = ((torch.arange(out, dtype=torch.float64) + 0.5) * size / out - 0.5).clamp(0, size - 1)
    image = lambda rows, cols: (a * rows[:, None] + b * cols[None, :] + c)[None, None]   # noqa: E731
    return image(i, i), image(u, u)


def test_regression_loss_upsamples_bilinearly_to_224():
    """LPIPS sees both images bilinearly upsampled to 224 x 224 (DMD §3.3), the default here and in the config."""
    seen = []
    record = lambda a, b: seen.append((a, b)) or (a - b).abs().mean((1, 2, 3))   # noqa: E731   a stand-in LPIPS
    (x, x_224), (y, y_224) = bilinear_oracle(0.1, 0.15, -0.9, 8, 224), bilinear_oracle(-0.05, 0.2, -0.5, 8, 224)
    loss = regression_loss(x.expand(2, 3, -1, -1), y.expand(2, 3, -1, -1), record)
    a, b = seen[0]
    assert a.shape == b.shape == (2, 3, 224, 224)
    torch.testing.assert_close(a, x_224.expand(2, 3, -1, -1).float())
    torch.testing.assert_close(b, y_224.expand(2, 3, -1, -1).float())
    torch.testing.assert_close(loss, (x_224 - y_224).abs().mean().float())
    assert make_config("cifar10").lpips_resolution == make_config("imagenet64").lpips_resolution == 224


def test_lpips_sees_a_gray_channel_three_times():
    seen = []
    x, y = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    regression_loss(x, y, lambda a, b: seen.append((a, b)) or (a - b).abs().mean((1, 2, 3)))
    a, b = seen[0]
    assert a.shape == b.shape == (2, 3, 224, 224)
    assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2]) and torch.equal(b[:, 1], b[:, 2])


def test_lpips_regression_trains_the_generator(random_lpips, teacher_file):
    teacher = load_denoiser(teacher_file).requires_grad_(False)
    generator = OneStepGenerator(trainable_copy(teacher))
    lpips_before = {k: v.clone() for k, v in random_lpips.state_dict().items()}
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert regression_loss(x, x, random_lpips, 32) == 0                       # LPIPS(x, x) = 0
    cfg = tiny("unused", teacher_file, distribution_matching=False, lambda_reg=1.0, lpips_resolution=32)
    nets = dict(teacher=teacher, generator=generator, fake_score=None, lpips=random_lpips)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=1e-3)
    pair_batch = dict(z=torch.randn(2, 3, 8, 8), y=x, labels=torch.tensor([0, 1]))
    before = [p.clone() for p in generator.parameters()]
    _, _, metrics = generator_step(cfg, nets, optimizer, pair_batch, sigma_levels())
    assert metrics["loss_reg"] > 0 and 0 < metrics["grad_norm"] < math.inf
    assert sum(not torch.equal(a, b) for a, b in zip(before, generator.parameters())) > 10
    assert_same(lpips_before, random_lpips.state_dict())
    assert not random_lpips.training and all(p.grad is None for p in random_lpips.parameters())


def test_missing_vgg_weights_is_a_one_line_error(teacher_file, tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))   # an empty torch.hub cache

    def offline(url, *args, **kwargs):   # as without internet, even where the tests have some
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--dataset", "shapes", "--resolution", "8", "--teacher", teacher_file, "--device", "cpu",
                    "--regression-loss", "lpips", "--out", str(tmp_path / "run")])
    message = exit_info.value.code
    assert "\n" not in message and "vgg16-397923af.pth" in message and "--regression-loss l2" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message


@pytest.mark.parametrize("flags, pooling", [([], "avg"), (["--lpips-pooling", "max"], "max")])
def test_lpips_pooling_flag_reaches_lpips_vgg(teacher_file, tmp_path, monkeypatch, flags, pooling):
    calls = []

    def record(device, pooling):
        calls.append(pooling)
        raise DMDError("stop here")
    monkeypatch.setattr("dmd_minimal.train.lpips_vgg", record)
    message = cli_error(["--dataset", "shapes", "--resolution", "8", "--teacher", teacher_file, "--device", "cpu",
                         "--regression-loss", "lpips", "--out", str(tmp_path / "run")] + flags)
    assert calls == [pooling] and message == "error: stop here"


def test_non_finite_gradients_are_skipped():
    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    before = [p.clone() for p in net.parameters()]
    net(torch.tensor([[math.inf, 1.0]])).sum().backward()
    norm = step_optimizer(net, optimizer, grad_clip=10.0)
    assert not math.isfinite(norm) and optimizer.state_dict()["state"] == {}
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    optimizer.zero_grad(set_to_none=True)
    net(torch.ones(1, 2)).sum().backward()
    assert math.isfinite(step_optimizer(net, optimizer, grad_clip=10.0))
    assert not torch.equal(before[0], net.weight)


def test_bf16_autocast_runs_on_cpu(teacher_file, tmp_path):
    cfg = tiny(tmp_path, teacher_file, precision="bf16", dmd_steps=2, grid_size=0)
    train(dataclasses.replace(cfg, stage="pairs"))   # the pairs are made in fp32 whatever the precision
    dtypes = set()   # the autocast dtype each backbone call runs under

    def record(module, args):
        if isinstance(module, SongUNet):
            dtypes.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        generator = train(cfg)
    finally:
        hook.remove()
    assert dtypes == {torch.bfloat16}                                   # every backbone call ran in bf16,
    assert all(p.dtype == torch.float32 for p in generator.parameters())   # its weights stay fp32
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(log[-1][k]) for k in ("loss_dm", "loss_reg", "loss_fake"))


@pytest.mark.gpu
def test_fp16_with_grad_scaler_on_cuda(teacher_file, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # without regression: the jittered teacher's pairs are far from its one-step output, whose gradients
    # would overflow fp16 for the many steps GradScaler needs to shrink its factor from 2^16
    generator = train(tiny(tmp_path, teacher_file, device="cuda", precision="fp16", lambda_reg=0.0, dmd_steps=8,
                           grid_size=0))
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(saved["scalers"]) == {"generator", "fake_score"} and saved["scalers"]["generator"]["scale"] > 0
    assert saved["step"] == 8 and saved["skipped"]["generator"] < 8
    assert all(p.isfinite().all() for p in generator.parameters())


def test_stages_teacher_then_pairs_on_shapes(tmp_path):
    cfg = make_config("shapes", resolution=8, out=str(tmp_path), device="cpu", stage="teacher", teacher_steps=3,
                      teacher_batch=8, model_channels=8, num_pairs=16, pair_steps=2, batch_size=8)
    teacher = train(cfg)
    assert teacher.label_dim == 4 and (tmp_path / "teacher.pt").exists() and not (tmp_path / "pairs").exists()
    pairs = train(dataclasses.replace(cfg, stage="pairs"))   # reuses OUT/teacher.pt
    assert pairs["z"].shape == pairs["y"].shape == (16, 3, 8, 8) and pairs["labels"].tolist()[:5] == [0, 1, 2, 3, 0]
    assert not (tmp_path / "checkpoint.pt").exists()


def cli_error(argv):
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code


def test_bad_input_gives_one_line_errors_and_damages_nothing(straight_run, teacher_file, tmp_path):
    gray = tiny_teacher(tmp_path / "gray.pt", channels=1)
    corrupt = tmp_path / "corrupt" / "checkpoint.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a checkpoint")
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in [corrupt, *straight_run.glob("checkpoint*.pt")]}
    tiny_args = ["--dataset", "shapes", "--resolution", "8", "--device", "cpu", "--num-pairs", "16",
                 "--pair-steps", "2", "--batch-size", "8", "--dmd-steps", "4", "--grid-size", "0",
                 "--regression-loss", "l2"]
    cases = [
        (["--resolution", "16", "--teacher", teacher_file],
         "makes samples (3, 8, 8) with 4 classes, but shapes has (3, 16, 16)"),
        (["--teacher", gray], "makes samples (1, 8, 8)"),
        (["--unconditional", "--teacher", teacher_file], "but shapes --unconditional has (3, 8, 8) with 0"),
        (["--dataset", "cifar10", "--resolution", "32", "--stage", "teacher", "--data-dir", str(tmp_path / "nope")],
         "CIFAR-10 not found"),
        (["--dataset", "cifar10", "--resolution", "32"], "edm-cifar10-32x32-cond-vp.pkl"),
        (["--teacher", teacher_file, "--out", str(corrupt.parent)], "is corrupt"),
        (["--teacher", teacher_file, "--out", str(straight_run), "--lambda-reg", "1"], "lambda_reg=0.25, not 1.0"),
        (["--teacher", teacher_file, "--resume", str(tmp_path / "missing.pt")], "does not exist"),
        (["--teacher", teacher_file, "--precision", "fp16"], "needs CUDA"),
        (["--teacher", teacher_file, "--batch-size", "32", "--num-pairs", "16"], "smaller than one regression batch"),
    ]
    for argv, fragment in cases:
        argv = tiny_args + ["--out", str(tmp_path / "run")] + argv   # later flags win
        message = cli_error(argv)
        assert fragment in message and "\n" not in message, (argv, message)
    assert files == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.gpu
def test_bf16_with_lpips_on_cuda(teacher_file, random_lpips, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr("dmd_minimal.train.lpips_vgg", lambda device, pooling: random_lpips.to(device))
    generator = train(tiny(tmp_path, teacher_file, device="cuda", precision="bf16", regression_loss="lpips",
                           lpips_resolution=64, dmd_steps=8, grid_size=0))
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == 8 and saved["skipped"] == dict(generator=0, fake_score=0) and not saved["scalers"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r[k]) for r in log for k in ("loss_dm", "loss_reg", "loss_fake"))
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in generator.parameters())


def test_ema_ramp_up_follows_edm():
    """EDM training_loop.py: half-life min(batch ln 0.5 / ln decay, rampup * images seen), beta = 0.5^(batch / half-life)."""
    assert ema_decay(0.999, 128, 12_800) == 0.999                                 # no ramp-up: the decay itself
    half_life = min(128 * math.log(0.5) / math.log(0.999), 0.05 * 12_800)        # 640 images: the ramp-up binds
    assert ema_decay(0.999, 128, 12_800, rampup=0.05) == pytest.approx(0.5 ** (128 / half_life))
    assert ema_decay(0.999, 128, 10**8, rampup=0.05) == pytest.approx(0.999)     # late in training: the decay
    assert ema_decay(0.999, 128, 128, rampup=0.05) < 1e-6                        # the first step: almost a copy


def test_xflip_mirrors_about_half_the_images_left_right():
    x = torch.randn(400, 1, 4, 6)
    y = xflip(x)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    assert torch.equal(flipped | (y == x).flatten(1).all(1), torch.ones(400, dtype=torch.bool))   # each one or the other
    assert 150 < flipped.sum() < 250
