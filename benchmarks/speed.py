"""What one step buys: the one-step generator against the teacher's Heun sampler, and what a DMD
training iteration costs next to the network passes it is made of.

    python benchmarks/speed.py                                         # cifar10 network, CUDA when available
    python benchmarks/speed.py --network imagenet64 --precision fp16
    OMP_NUM_THREADS=2 python benchmarks/speed.py --device cpu          # CPU: long rows are extrapolated
    python benchmarks/speed.py --network tiny --batch-sizes 1 2 --steps 2 3 --train-batch 1   # smoke test

Table 1: images per second of G(z) (1 NFE) and of the teacher's deterministic Heun sampler
(sampler.sample_ode, 2N - 1 NFE for N steps), on the same network, with the measured speed-up next to
the NFE ratio: it falls short of the ratio by what the sampler's own arithmetic and calls cost.
Table 2: one DMD iteration exactly as train.py runs it (train.generator_step + train.fake_score_step,
DMD Algorithm 1), next to each network pass it needs, timed alone, and the AdamW steps; what is left
over is what the iteration spends besides them (loss arithmetic, copies, syncs): where waste shows.
Peak memory is torch.cuda.max_memory_allocated during a run (on CUDA), everything resident included.

Networks are randomly initialised (speed does not depend on the weights) and are EDM's own
(networks.IMAGE_NETWORKS, dropout off as in distillation). Every timing is the median over
--repeats runs after one warm-up run, with torch.cuda.synchronize on CUDA. A Heun row whose single
run would take longer than --max-seconds is not run in full: its time is scaled from a shorter
Heun run at the same batch size by the NFE ratio (a network evaluation costs the same at every
sigma), and its row says "extrapolated". On CPUs the full networks are slow (one forward pass is 42
GFLOP per image for DDPM++ and 219 for ADM, by torch's FLOP counter), hence --max-seconds 120 there.
"""
import argparse
import os
import platform
import resource
import statistics
import sys
import time
import warnings

import torch

from dmd_minimal.config import PRESETS, TEACHER_NETWORKS, make_config
from dmd_minimal.data import DATA_SPECS
from dmd_minimal.denoiser import append_dims
from dmd_minimal.dmd_loss import draw_sigmas, fake_score_loss, lpips_vgg, regression_loss, sigma_levels
from dmd_minimal.generator import OneStepGenerator
from dmd_minimal.networks import IMAGE_NETWORKS, build_denoiser, sample_shape
from dmd_minimal.sampler import sample_ode
from dmd_minimal.train import AMP_DTYPES, fake_score_step, generator_step, random_labels, resolve, trainable_copy
from dmd_minimal.utils import DMDError

NETWORKS = {   # --network: (the config preset it trains under, its network)
    "cifar10": ("cifar10", dict(IMAGE_NETWORKS["cifar10"], dropout=0.0)),           # DDPM++, 56M parameters
    "imagenet64": ("imagenet64", dict(IMAGE_NETWORKS["imagenet64"], dropout=0.0)),  # ADM, 296M parameters
    "tiny": ("shapes", dict(TEACHER_NETWORKS["shapes"], img_resolution=PRESETS["shapes"]["resolution"],
                            in_channels=3, out_channels=3)),
}
TRAIN_BATCH = {"cifar10": 56, "imagenet64": 48, "tiny": 8}   # per GPU in the paper: 392 and 336 on 7 GPUs
VGG16_FILE = "vgg16-397923af.pth"   # what torchvision's VGG16, and so LPIPS, loads from torch.hub's cache


# ---- timing ------------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, repeats, max_seconds=0.0, warmup=True):
    """(median seconds of fn(), runs timed, peak CUDA bytes of a run or None), after a warm-up call.

    Repeating stops once the timed runs together pass max_seconds (0: no limit); there is always one.
    """
    if warmup:   # kernel selection, the allocator's first blocks, AdamW's state
        fn()
        synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    while len(times) < repeats and not (max_seconds and sum(times) >= max_seconds):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), len(times), peak


def gib(nbytes):
    return "n/a (CPU)" if nbytes is None else f"{nbytes / 2**30:.2f}"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


# ---- table 1: sampling -------------------------------------------------------------------------

def sampling_row(batch_size, name, nfe, seconds, t_one, peak, how):
    """One row of table 1; t_one is the generator's time at this batch size."""
    speedup = "1" if nfe == 1 else f"{seconds / t_one:.1f}"
    return (batch_size, name, nfe, f"{seconds:.4g}", f"{batch_size / seconds:.4g}", speedup, nfe, gib(peak), how)


@torch.no_grad()
def sampling_rows(teacher, generator, batch_size, args, device):
    """Rows of table 1 for one batch size: the generator, then Heun at each step count."""
    z = torch.randn(batch_size, *sample_shape(teacher), device=device)
    labels = random_labels(teacher.label_dim, batch_size, device)
    t_one, runs, peak = measure(lambda: generator(z, labels), device, args.repeats, args.max_seconds)
    rows = [sampling_row(batch_size, "one-step generator", 1, t_one, t_one, peak, f"measured, median of {runs}")]
    longest = None   # (steps, seconds) of the longest Heun run timed so far at this batch size
    for N in sorted(args.steps):
        nfe = 2 * N - 1
        per_nfe = longest[1] / (2 * longest[0] - 1) if longest else t_one
        if args.max_seconds and nfe * per_nfe > args.max_seconds:
            if longest is None:   # time the longest Heun run that fits (at least 2 steps) to scale from
                k = max(2, int((args.max_seconds / t_one + 1) // 2))
                t_k, _, peak = measure(lambda: sample_ode(teacher, z, k, labels), device, 1, warmup=False)
                longest = (k, t_k)
            seconds = longest[1] * nfe / (2 * longest[0] - 1)
            how = f"extrapolated from a measured {longest[0]}-step run"
        else:   # the generator's runs above warmed this network up at this batch size
            seconds, runs, peak = measure(lambda: sample_ode(teacher, z, N, labels), device, args.repeats,
                                          args.max_seconds, warmup=False)
            longest, how = (N, seconds), f"measured, median of {runs}"
        rows.append(sampling_row(batch_size, f"teacher Heun, {N} steps", nfe, seconds, t_one, peak, how))
    return rows


# ---- table 2: one DMD iteration ----------------------------------------------------------------

def load_lpips(device):
    """LPIPS-VGG16 as training loads it; with a random VGG16 trunk (same cost) when its weights are missing."""
    if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)):
        return lpips_vgg(device), "LPIPS-VGG16"
    import lpips
    with warnings.catch_warnings():   # lpips passes torchvision's deprecated pretrained=False
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    return (net.to(device).eval().requires_grad_(False),
            f"LPIPS with a random VGG16 trunk ({VGG16_FILE} not in torch.hub's cache; same cost)")


def training_rows(teacher, cfg, lpips, args, device):
    """Rows of table 2: the parts of one DMD iteration timed alone, then the iteration itself."""
    B, shape = cfg.batch_size, sample_shape(teacher)
    generator, fake_score = OneStepGenerator(trainable_copy(teacher), cfg.sigma_max), trainable_copy(teacher)
    nets = dict(teacher=teacher, generator=generator, fake_score=fake_score, lpips=lpips)
    optimizers = {name: torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
                  for name, net, lr in (("generator", generator, cfg.lr), ("fake_score", fake_score, cfg.fake_lr))}
    scalers = {k: torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None for k in optimizers}
    levels = sigma_levels(cfg.num_levels, cfg.sigma_min, cfg.sigma_max, cfg.rho, device)
    labels = random_labels(teacher.label_dim, B, device)
    pair_batch = dict(z=torch.randn(B, *shape, device=device), y=torch.rand(B, *shape, device=device) * 2 - 1,
                      labels=labels)

    def iteration():   # DMD Algorithm 1, as train.run_dmd calls it
        x, x_labels, _ = generator_step(cfg, nets, optimizers["generator"], pair_batch, levels, scalers["generator"])
        fake_score_step(cfg, fake_score, optimizers["fake_score"], x, x_labels, levels, scalers["fake_score"])

    # The same tensors each pass sees inside the iteration.
    z = torch.randn(B, *shape, device=device)
    x = torch.rand(B, *shape, device=device) * 2 - 1               # stands in for G(z)
    sigma = draw_sigmas(levels, B, cfg.dm_min_level, cfg.dm_max_level)
    x_t = x + append_dims(sigma, x.ndim) * torch.randn_like(x)
    upstream = torch.randn(B, *shape, device=device)               # d loss / d G(z)

    @torch.no_grad()
    def forward(net):   # mu_real or mu_fake, as dmd_gradient evaluates them
        return net(x_t, sigma, labels)

    def generator_pass():   # the DM batch, then the regression batch, as generator_step runs them
        generator.zero_grad(set_to_none=True)
        generator(z, labels).backward(upstream)
        generator(pair_batch["z"], pair_batch["labels"]).backward(upstream)

    def fake_score_train_pass():
        fake_score.zero_grad(set_to_none=True)
        fake_score_loss(fake_score, x, draw_sigmas(levels, len(x)), labels).backward()

    def lpips_pass():   # backward into the generator's images, LPIPS itself is frozen
        regression_loss(x.clone().requires_grad_(True), pair_batch["y"], lpips, cfg.lpips_resolution).backward()

    def optimizer_steps():   # the gradients the two passes above left behind
        for name, net in (("generator", generator), ("fake_score", fake_score)):
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            optimizers[name].step()

    res = cfg.lpips_resolution
    passes = [
        (f"generator forward+backward, 2 x {B} samples (the DM batch, then the regression batch)", generator_pass),
        ("teacher forward (mu_real)", lambda: forward(teacher)),
        ("fake-score forward (mu_fake)", lambda: forward(fake_score)),
        ("fake-score forward+backward (its denoising loss)", fake_score_train_pass),
        (f"LPIPS forward+backward (pairs upsampled to {res}x{res})", lpips_pass),
    ]
    iteration()   # AdamW's state now exists, so that every peak below counts it
    timed = {name: measure(fn, device, args.repeats, args.max_seconds) for name, fn in passes}
    optimizer = measure(optimizer_steps, device, args.repeats, args.max_seconds)
    total = measure(iteration, device, args.repeats, args.max_seconds)
    t_iter, t_passes = total[0], sum(t for t, _, _ in timed.values())

    def row(name, seconds, runs="", peak=""):
        return (name, f"{1000 * seconds:.1f}", f"{100 * seconds / t_iter:.1f}%", peak, runs)
    return [row(name, t, runs, gib(peak)) for name, (t, runs, peak) in timed.items()] + [
        row("**sum of the network passes**", t_passes),
        row("AdamW steps with gradient clipping (both networks)", optimizer[0], optimizer[1], gib(optimizer[2])),
        row("**one DMD iteration** (train.generator_step + train.fake_score_step)", t_iter, total[1], gib(total[2])),
        row("rest: iteration - passes - AdamW (loss arithmetic, copies, syncs)", t_iter - t_passes - optimizer[0])]


# ---- the run -----------------------------------------------------------------------------------

def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="cifar10",
                        help="EDM's CIFAR-10 DDPM++, ImageNet-64 ADM, or a 16x16 SongUNet for smoke tests")
    parser.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="",
                        help="autocast around the networks, as in training (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="sampling batch sizes")
    parser.add_argument("--steps", type=int, nargs="+", default=[18, 40, 256], help="Heun steps (2N-1 NFE)")
    parser.add_argument("--train-batch", type=int, default=0,
                        help="DMD batch of table 2 (default: the paper's per-GPU batch on CUDA, 4 on CPU)")
    parser.add_argument("--no-training", action="store_true", help="time only the samplers (table 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (the median is shown)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="longest a row may run before Heun rows are extrapolated and repeats stop "
                             "(default: 120 on CPU, no limit on CUDA; 0: no limit)")
    args = parser.parse_args(argv)
    for flag in ("batch_sizes", "steps"):
        if min(getattr(args, flag)) < 1:
            raise DMDError(f"--{flag.replace('_', '-')} must all be at least 1")
    if args.repeats < 1 or args.train_batch < 0:
        raise DMDError("--repeats must be at least 1 and --train-batch at least 0")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        preset, network = NETWORKS[args.network]
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DMDError(f"--device {args.device}: this machine has no CUDA; use --device cpu")
        batch_size = args.train_batch or (TRAIN_BATCH[args.network] if device.type == "cuda" else 4)
        cfg = resolve(make_config(preset, device=str(device), precision=args.precision, batch_size=batch_size,
                                  regression_loss="lpips", num_pairs=batch_size))   # one pair batch, reused
        if args.max_seconds is None:
            args.max_seconds = 0.0 if device.type == "cuda" else 120.0
        if device.type == "cuda":   # as train.py: TF32 for what runs in fp32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(0)
        teacher = build_denoiser(sigma_data=0.5, label_dim=DATA_SPECS[preset][2], **network)
        teacher = teacher.to(device).requires_grad_(False).eval()
        teacher.amp_dtype = AMP_DTYPES[cfg.precision]   # the copies below inherit it, as in train.py
        generator = OneStepGenerator(teacher, cfg.sigma_max)   # for sampling speed, the teacher's weights do
        millions = sum(p.numel() for p in teacher.parameters()) / 1e6
        print(f"## Speed: {args.network} network ({network['arch']}, {millions:.1f}M parameters), "
              f"{device.type} {cfg.precision}\n\nmachine: {machine(device)}\n")
        rows = [row for B in args.batch_sizes for row in sampling_rows(teacher, generator, B, args, device)]
        print(markdown(("batch", "sampler", "NFE", "s per batch", "images/s", "speed-up of the generator",
                        "NFE ratio", "peak GiB", "how"), rows))
        if not args.no_training:
            lpips, lpips_name = load_lpips(device)
            print(f"\nOne DMD iteration at batch {cfg.batch_size} (DM and regression batches alike), "
                  f"lambda_reg {cfg.lambda_reg}, regression loss: {lpips_name}.\n")
            print(markdown(("part", "ms", "share of the iteration", "peak GiB", "runs"),
                           training_rows(teacher, cfg, lpips, args, device)))
        if device.type == "cpu":
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
            print(f"\npeak resident memory of the whole process (ru_maxrss, every table above): {kib / 2**20:.2f} GiB")
    except DMDError as e:
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory: lower --batch-sizes or --train-batch")


if __name__ == "__main__":
    main()
