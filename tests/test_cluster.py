"""What a cluster does to a run, tried on the CPU: gloo processes, micro-batches, signals from a scheduler (to
the process, and to torchrun's launcher), a second run in the same folder, short collective timeouts."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dmd_minimal import dist
from dmd_minimal.checkpoint import load_checkpoint
from dmd_minimal.config import make_config, parse_config
from dmd_minimal.dmd_loss import sigma_levels
from dmd_minimal.load import load_denoiser
from dmd_minimal.pairs import heun_sampler, load_pairs, make_pairs, pairs_manifest
from dmd_minimal.train import build_dmd, fake_score_step, generator_step, resolve, step_optimizer, train
from dmd_minimal.train import main as train_main
from dmd_minimal.utils import DMDError, run_lock
from test_train_images import tiny_teacher


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    """A small grid25 teacher (a few hundred steps: the mechanisms here do not need a good one)."""
    out = tmp_path_factory.mktemp("toy")
    train(make_config("toy2d", out=str(out), stage="teacher", teacher_steps=300, teacher_batch=256, device="cpu"))
    return str(out / "teacher.pt")


def toy(out, teacher, **overrides):
    return make_config("toy2d", **{**dict(out=str(out), teacher=teacher, device="cpu", num_pairs=64, batch_size=16,
                                          dmd_steps=3, log_every=1, num_eval=100), **overrides})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_process(rank, world_size, port, timeout=60):
    """This process as process `rank` of torchrun's `world_size`, in a gloo group (dist.setup)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.setup("cpu", timeout)


def _worker(rank, world_size, port, folder, timeout, job, args):
    try:
        as_process(rank, world_size, port, timeout)
        result = job(*args)
    except Exception as e:   # a refused run is a result too
        result = e if isinstance(e, DMDError) else RuntimeError(traceback.format_exc())
    finally:
        dist.cleanup()
    torch.save(result, f"{folder}/result-{rank}.pt")


def in_processes(job, *args, world_size=2, folder, timeout=60):
    """job(*args) in world_size forked gloo processes (collectives time out after `timeout` seconds): their
    results (or DMDErrors), by rank."""
    mp.start_processes(_worker, args=(world_size, free_port(), str(folder), timeout, job, args), nprocs=world_size,
                       start_method="fork")
    return [torch.load(f"{folder}/result-{r}.pt", weights_only=False) for r in range(world_size)]


# ---- micro-batches and processes take the same step -------------------------------------------------

def image_step(teacher, batch_gpu):
    """The gradients (lr 0) that one generator step and one fake-score step leave, on an 8x8 class-conditional
    network, with a regression batch: {network.parameter: grad}, these networks' full-batch share."""
    cfg = resolve(make_config("shapes", resolution=8, teacher=teacher, device="cpu", batch_size=8, batch_gpu=batch_gpu,
                              lr=1e-30, fake_lr=1e-30, lambda_reg=0.25, regression_loss="l2"))
    torch.manual_seed(0)
    nets, training = build_dmd(cfg, load_denoiser(teacher))
    levels = sigma_levels()
    pairs = dict(z=torch.randn(8, 3, 8, 8), y=torch.randn(8, 3, 8, 8), labels=torch.arange(8) % 4)
    B = 8 // dist.world_size()
    mine = {k: v[dist.rank() * B:(dist.rank() + 1) * B] for k, v in pairs.items()}   # as pair_batches splits them
    torch.manual_seed(1)
    x, labels, metrics = generator_step(cfg, nets, training["optimizers"]["generator"], mine, levels)
    fake = fake_score_step(cfg, nets["fake_score"], training["optimizers"]["fake_score"], x, labels, levels)
    grads = {f"{name}.{key}": p.grad.clone() for name in ("generator", "fake_score")
             for key, p in dist.unwrap(nets[name]).named_parameters() if p.grad is not None}
    return grads, dict(metrics, **fake)


def test_micro_batches_and_processes_give_the_full_batch_gradient(tmp_path):
    """--batch-gpu accumulates, DDP averages (not sums: Adam would hide a factor of 2): every network's gradient
    equals the one process, full batch gradient up to float rounding."""
    teacher = tiny_teacher(tmp_path / "teacher.pt")
    full, metrics = image_step(teacher, 0)
    micro, micro_metrics = image_step(teacher, 2)
    two = in_processes(image_step, teacher, 0, folder=tmp_path)
    two_micro = in_processes(image_step, teacher, 1, folder=tmp_path)
    for grads in (micro, two[0][0], two[1][0], two_micro[0][0], two_micro[1][0]):
        assert grads.keys() == full.keys()
        for key in full:
            assert torch.allclose(grads[key], full[key], rtol=1e-4, atol=1e-7), key
    assert sum(g.abs().sum() for g in full.values()) > 0
    for name in ("loss_dm", "loss_reg", "loss_fake"):
        assert micro_metrics[name] == pytest.approx(metrics[name], rel=1e-5)
        assert (two[0][1][name] + two[1][1][name]) / 2 == pytest.approx(metrics[name], rel=1e-5)


def test_a_run_on_two_processes_logs_and_learns_as_one_process(toy_teacher, tmp_path):
    """train() end to end: 2 processes, or micro-batches of 4 with two fake-score steps (fresh samples), make the
    same generator and log the same losses (averaged over the processes) as one process."""
    runs = {name: toy(tmp_path / name, toy_teacher, fake_steps_per_generator_step=2, **kw)
            for name, kw in (("one", {}), ("micro", dict(batch_gpu=4)), ("two", {}))}
    one, micro = train(runs["one"]), train(runs["micro"])
    in_processes(train, runs["two"], folder=tmp_path)
    two = load_denoiser(tmp_path / "two" / "checkpoint.pt", "generator")
    z = torch.randn(256, 2)
    with torch.no_grad():
        moved = (one(z) - load_denoiser(toy_teacher)(80 * z, torch.full((256,), 80.0))).abs().max()
        for other in (micro.denoiser, two):
            differ = (one.denoiser(80 * z, torch.full((256,), 80.0)) - other(80 * z, torch.full((256,), 80.0))).abs()
            assert differ.max() < 1e-4 * moved
    logs = {name: [json.loads(line) for line in open(tmp_path / name / "log.jsonl")] for name in runs}
    for name in ("micro", "two"):
        for a, b in zip(logs["one"], logs[name]):
            for key in ("loss_dm", "loss_reg", "loss_fake"):
                assert b[key] == pytest.approx(a[key], rel=1e-4), (name, key)


@pytest.mark.parametrize("batch_gpu, expected", [(5, "must divide each process's share of --batch-size (16 / 1 "
                                                     "process(es) = 16): e.g. --batch-gpu 4"),
                                                 (32, "must divide each process's share")])
def test_a_batch_gpu_that_does_not_divide_the_share_is_a_one_line_error(toy_teacher, tmp_path, batch_gpu, expected):
    with pytest.raises(DMDError, match=f"--batch-gpu {batch_gpu} " + expected.replace("(", r"\(").replace(")", r"\)")):
        resolve(toy(tmp_path, toy_teacher, batch_gpu=batch_gpu))


# ---- no process waits on work another does alone ----------------------------------------------------

def pairs_job(teacher_path, folder, count):
    teacher = load_denoiser(teacher_path)
    manifest = pairs_manifest(teacher, count, 0, heun_sampler(2), shard_size=3)
    return make_pairs(teacher, folder, manifest, rank=dist.rank(), world_size=dist.world_size())


def test_each_process_makes_an_equal_share_of_the_missing_pairs(toy_teacher, tmp_path):
    """7 pairs in shards of 3 on 2 processes: 4 and 3 pairs (whole shards would give 6 and 1), the same pairs
    as one process makes; after some are lost, the processes split the missing ones."""
    made = in_processes(pairs_job, toy_teacher, str(tmp_path / "two"), 7, folder=tmp_path)
    assert made == [4, 3]
    assert pairs_job(toy_teacher, str(tmp_path / "one"), 7) == 7
    two, one = load_pairs(tmp_path / "two"), load_pairs(tmp_path / "one")
    assert torch.equal(two["y"][:], one["y"][:]) and torch.equal(two["z"][:], one["z"][:])
    assert sorted(p for p in os.listdir(tmp_path / "two") if p.startswith("shard")) == [
        "shard-00000.pt", "shard-00001-3-4.pt", "shard-00001-4-6.pt", "shard-00002.pt"]   # rank 0: 0..3, rank 1: 4..6
    for name in ("shard-00000.pt", "shard-00002.pt"):
        os.remove(tmp_path / "two" / name)   # pairs 0..2 and 6 lost
    assert in_processes(pairs_job, toy_teacher, str(tmp_path / "two"), 7, folder=tmp_path) == [2, 2]
    assert torch.equal(load_pairs(tmp_path / "two")["y"][:], one["y"][:])


def test_a_teacher_is_not_trained_while_other_processes_wait(tmp_path):
    """Training a teacher under torchrun is refused at once on every process, with the way to do it."""
    cfg = make_config("toy2d", out=str(tmp_path / "run"), device="cpu", teacher_steps=100000)
    errors = in_processes(train, cfg, folder=tmp_path)
    for error in errors:
        assert isinstance(error, DMDError)
        assert str(error).startswith("a teacher trains in one process: run this command with --stage teacher "
                                     "without torchrun first")


def late_barrier(delay):
    """Process 1 reaches the barrier `delay` seconds after process 0."""
    if dist.rank() == 1:
        time.sleep(delay)
    try:
        dist.barrier()
        return "passed"
    except RuntimeError as e:
        return f"timed out: {type(e).__name__}"


def test_the_collective_timeout_is_dist_timeout(tmp_path):
    """dist.setup's timeout reaches the process group: a wait longer than it stops the run (rather than
    PyTorch's default of 10 to 30 minutes), and a shorter one passes."""
    assert in_processes(late_barrier, 0.5, folder=tmp_path, timeout=30) == ["passed", "passed"]
    assert in_processes(late_barrier, 8, folder=tmp_path, timeout=2)[0].startswith("timed out")


# ---- preemption: a scheduler's signal saves the run ------------------------------------------------

def torchrun(*args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return launcher + ["-m", "dmd_minimal.train", *map(str, args)], env


def signalled(argv, env, out, signum):
    """Run argv, send signum once its DMD loop has logged, and return (exit status, stderr)."""
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while not (out / "log.jsonl").exists() or not open(out / "log.jsonl").read():
        assert process.poll() is None and time.time() < deadline, "the run ended before it was signalled"
        time.sleep(0.1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def final_weights(path):
    return load_checkpoint(path)["generator"]["state_dict"]


@pytest.mark.parametrize("signum, nproc", [(signal.SIGTERM, 1), (signal.SIGUSR1, 1), (signal.SIGTERM, 2)],
                         ids=["SIGTERM", "SIGUSR1", "SIGTERM-to-torchrun"])
def test_a_schedulers_signal_saves_once_and_the_same_command_resumes_exactly(toy_teacher, tmp_path, signum, nproc):
    """The run finishes its step, saves one checkpoint, exits non-zero with one line, and the same command
    continues to weights bit-equal to a run never interrupted. Under torchrun the signal goes to the launcher,
    which passes it to every worker."""
    args = ["--teacher", toy_teacher, "--batch-size", 32, "--num-pairs", 128, "--dmd-steps", 200, "--log-every", 5,
            "--checkpoint-every", 100000, "--num-eval", 100]
    argv, env = torchrun(*args, "--out", tmp_path / "cut", nproc=nproc)
    status, err = signalled(argv, env, tmp_path / "cut", signum)
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if line.startswith("error: interrupted")]
    assert status != 0 and len(lines) == nproc and len(set(lines)) == 1, err
    step = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"]
    assert lines[0] == (f"error: interrupted ({name}): saved {tmp_path / 'cut' / 'checkpoint.pt'} at step {step}; "
                        f"rerun the same command to resume")
    assert 0 < step < 200 and not list((tmp_path / "cut").glob("checkpoint-*.pt"))   # saved once
    assert subprocess.run(argv, env=env, capture_output=True).returncode == 0
    straight = parse_config(list(map(str, args)) + ["--out", str(tmp_path / "straight")])   # the same run, in one go
    train(straight) if nproc == 1 else in_processes(train, straight, world_size=nproc, folder=tmp_path)
    cut, straight = final_weights(tmp_path / "cut" / "checkpoint.pt"), final_weights(tmp_path / "straight" / "checkpoint.pt")
    assert all(torch.equal(cut[k], straight[k]) for k in straight)


# ---- one run per output folder --------------------------------------------------------------------

def test_a_second_run_in_the_same_folder_stops_and_the_first_goes_on(toy_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dmd_minimal.utils import run_lock\n"
                               f"with run_lock({str(out)!r}):\n print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--teacher", toy_teacher, "--out", str(out), "--dmd-steps", "2"])
        assert exit_info.value.code == (f"error: {out} is in use by another run (process {holder.pid} on "
                                        f"{socket.gethostname()}): wait for it to end or stop it, or use another --out")
        assert holder.poll() is None and (out / ".lock").read_text().startswith(f"process {holder.pid} ")
        assert sorted(os.listdir(out)) == [".lock"]   # the second run wrote nothing
    finally:
        holder.kill()   # kill -9: the system releases the lock
        holder.wait()
    with run_lock(out):
        assert (out / ".lock").read_text().startswith(f"process {os.getpid()} ")


# ---- checkpoints that fit the scale ---------------------------------------------------------------

def test_checkpoints_hold_no_teacher_and_keep_the_previous_by_a_rename(toy_teacher, tmp_path):
    """The latest is checkpoint.pt, the one before it the same file renamed; the teacher is found through the
    provenance (load_denoiser, sampling) and checked by its hash."""
    cfg = toy(tmp_path / "run", toy_teacher, dmd_steps=4, checkpoint_every=2, keep_checkpoints=2, cosine_decay=False)
    train(dataclasses.replace(cfg, dmd_steps=2))
    inode = (tmp_path / "run" / "checkpoint.pt").stat().st_ino
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint*.pt")) == ["checkpoint-0000002.pt", "checkpoint.pt"]
    assert (tmp_path / "run" / "checkpoint-0000002.pt").stat().st_ino == inode   # renamed, not copied
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert "teacher" not in saved and saved["step"] == 4
    teacher = load_denoiser(tmp_path / "run" / "checkpoint.pt", "teacher")
    x, sigma = torch.randn(8, 2), torch.full((8,), 0.5)
    assert torch.equal(teacher(x, sigma), load_denoiser(toy_teacher)(x, sigma))


def test_a_checkpoint_whose_teacher_changed_is_not_sampled_with_another(toy_teacher, tmp_path):
    train(toy(tmp_path / "run", toy_teacher))
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    saved["provenance"]["teacher"] = "0" * 12
    saved.pop("checksum")
    torch.save(saved, tmp_path / "other.pt")
    with pytest.raises(DMDError, match=f"{toy_teacher} is not the teacher .* was distilled from"):
        load_denoiser(tmp_path / "other.pt", "teacher")


# ---- GPU details that a CPU can check -------------------------------------------------------------

def test_the_scaler_unscales_before_clipping_and_skips_a_non_finite_step():
    """A GradScaler (CPU) in step_optimizer: the norm is clipped and reported unscaled, the update equals the one
    without a scaler; an inf gradient leaves the weights alone and halves the scale."""
    def run(scaler, inf=False):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
        loss = net(torch.randn(8, 4)).pow(2).mean() * (float("inf") if inf else 1.0)
        (loss if scaler is None else scaler.scale(loss)).backward()
        norm = step_optimizer(net, optimizer, 0.5, scaler)
        return net, norm
    plain, plain_norm = run(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled, norm = run(scaler)
    assert norm == pytest.approx(plain_norm, rel=1e-6)   # unscaled: 2**10 times smaller than the scaled gradient
    assert all(torch.allclose(a, b) for a, b in zip(scaled.parameters(), plain.parameters()))
    torch.manual_seed(0)
    start = torch.nn.Linear(4, 1)
    skipped, _ = run(scaler, inf=True)
    assert all(torch.equal(a, b) for a, b in zip(skipped.parameters(), start.parameters()))
    assert scaler.get_scale() == 2.0**9


def test_conv_layers_keep_bf16_from_layer_to_layer():
    """Under bf16 autocast a convolution's bias is added in bf16 (EDM casts weights and bias to the activations'
    dtype), so the next layer gets bf16, not fp32."""
    from dmd_minimal.unet_layers import Conv, Init
    conv = Conv(4, 4, kernel=3, init=Init(bias=1.0), resample="up")
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), conv(x), atol=0.1)


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_bf16_is_the_default_only_where_the_gpu_has_it(monkeypatch, capability, expected):
    from dmd_minimal.train import default_precision
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert default_precision(torch.device("cuda")) == expected
    assert default_precision(torch.device("cpu")) == "fp32"


# ---- the headline commands, the dry run, monitoring -----------------------------------------------

def test_the_headline_command_distils_edms_teacher_and_offline_leaves_nothing_behind(tmp_path, monkeypatch):
    from dmd_minimal.load import EDM_TEACHERS, cache_path

    def offline(url, dst, *args, **kwargs):
        raise OSError("no internet")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--dataset", "imagenet64"])
    url = EDM_TEACHERS["imagenet64-cond"]
    assert exit_info.value.code == (f"error: cannot download {url} (no internet): without internet, download it "
                                    f"elsewhere and put it in {tmp_path / 'hub' / 'checkpoints'}/ as "
                                    f"{os.path.basename(cache_path(url))}")
    assert not (tmp_path / "runs").exists()
    for dataset, unconditional, key in (("cifar10", False, "cifar10-cond"), ("cifar10", True, "cifar10-uncond")):
        cfg = resolve(make_config(dataset, unconditional=unconditional, out=str(tmp_path / key)))
        assert cfg.teacher == EDM_TEACHERS[key] and cfg.eval_every > 0   # FID during training where it can be had


def test_the_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from dmd_minimal.dry_run import random_teacher
    plan = train(make_config("shapes", out=str(tmp_path / "run"), device="cpu", dry_run=True, batch_gpu=4))
    printed = capsys.readouterr().out
    teacher = random_teacher(resolve(make_config("shapes", device="cpu")))
    assert plan["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert plan["checkpoint_bytes"] > 2 * 4 * plan["parameters"]   # generator, fake score, Adam's two moments each
    assert plan["seconds_on_8"] < plan["seconds_on_1"]
    for line in ("networks", "iteration", "checkpoint", "pairs", "estimate"):
        assert f"  {line} " in printed
    assert not (tmp_path / "run").exists()
    cifar = random_teacher(resolve(make_config("cifar10", device="cpu")))   # EDM's DDPM++: 56M parameters
    assert round(sum(p.numel() for p in cifar.parameters()) / 1e6) == 56


def test_tensorboard_holds_the_logged_scalars_and_grids(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train_images import tiny
    out = tmp_path / "run"
    train(tiny(out, tiny_teacher(tmp_path / "teacher.pt"), tensorboard=True))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    for key in ("loss_dm", "loss_reg", "loss_fake", "lr", "grad_norm"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["step"] for r in log]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in log], rel=1e-6)
    grids = sorted(int(p.stem) for p in (out / "grids").glob("0*.png"))
    assert [image.step for image in events.Images("samples")] == grids
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # not installed
    with pytest.raises(DMDError, match=r"^--tensorboard needs the tensorboard package: pip install tensorboard$"):
        resolve(tiny(out, str(tmp_path / "teacher.pt"), tensorboard=True))


def download_job(hub, url):
    """cached_download in every process, through a slow fake download that records who downloaded."""
    from dmd_minimal.load import cached_download

    def slow(url, dst, *args, **kwargs):
        time.sleep(1)
        with open(dst, "w") as f:
            f.write(f"downloaded by {dist.rank()}")
    torch.hub.get_dir, torch.hub.download_url_to_file = (lambda: hub), slow
    with open(cached_download(url)) as f:
        return f.read()


def test_one_process_downloads_while_the_others_wait_for_it(tmp_path):
    got = in_processes(download_job, str(tmp_path / "hub"), "https://example.com/teacher.pkl", folder=tmp_path)
    assert got[0] == got[1] and got[0] in ("downloaded by 0", "downloaded by 1")


def test_the_weights_are_checked_where_a_log_line_or_a_checkpoint_is_written(toy_teacher, tmp_path, monkeypatch):
    """Checking every weight waits for the GPU: once per log interval (and before each checkpoint), not every step."""
    import dmd_minimal.train as train_module
    checked, divergence = [], train_module.divergence

    def recording(metrics, nets, *args):
        checked.append(nets is not None)
        return divergence(metrics, nets, *args)
    monkeypatch.setattr(train_module, "divergence", recording)
    train(toy(tmp_path, toy_teacher, dmd_steps=12, log_every=5, checkpoint_every=6))
    assert [step for step, weights in enumerate(checked, start=1) if weights] == [5, 6, 10, 12]
