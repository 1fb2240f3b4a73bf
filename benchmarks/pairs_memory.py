"""Memory of the regression pairs in a training process: all in RAM (as before) against mapped shards (now).

    python benchmarks/pairs_memory.py                  # 100k CIFAR-size pairs (3x32x32, fp32), in a temp folder
    python benchmarks/pairs_memory.py --num 20000 --dir /big/disk

Writes fake shards of both layouts (random y, no teacher): the previous one (z, y and labels in every shard,
load_pairs concatenated them all into RAM) and the current one (y alone, pairs.load_pairs maps it and makes
z from its seed). Each is loaded in a fresh subprocess, which reports its peak RSS (getrusage) and, from
/proc/self/status, its private (RssAnon) and file-backed (RssFile: page cache, shared by every process that
maps the same shards) memory right after loading and after one epoch of batch-64 regression batches
(train.pair_batches). Also times the batches themselves: per_index_noise and the gather from the shards.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from dmd_minimal.pairs import check_manifest, heun_sampler, load_pairs, shard_name
from dmd_minimal.train import pair_batches
from dmd_minimal.utils import atomic_save, per_index_noise

LABEL_DIM, BATCH = 10, 64


def write_shards(folder, num, shard_size, shape, layout):
    """Fake shards of random y: layout "before" (z, y, labels, as the previous make_pairs wrote) or "now"."""
    os.makedirs(folder, exist_ok=True)
    for k, start in enumerate(range(0, num, shard_size)):
        index = torch.arange(start, min(num, start + shard_size))
        y = torch.randn(len(index), *shape)
        if layout == "before":
            torch.save(dict(z=torch.randn_like(y), y=y, labels=index % LABEL_DIM, start=start),
                       os.path.join(folder, shard_name(k)))
        else:
            atomic_save(dict(y=y, start=start), os.path.join(folder, shard_name(k)))
    if layout == "now":
        check_manifest(folder, dict(count=num, shape=list(shape), seed=0, label_dim=LABEL_DIM, shard_size=shard_size,
                                    teacher="fake", teacher_path="", **heun_sampler(18)))


def load_in_ram(folder, num, shard_size):
    """The previous load_pairs: every shard's z and y loaded and concatenated."""
    shards = [torch.load(os.path.join(folder, shard_name(k)), map_location="cpu", weights_only=True)
              for k in range(-(-num // shard_size))]
    return dict(z=torch.cat([s["z"] for s in shards]), y=torch.cat([s["y"] for s in shards]),
                labels=torch.cat([s["labels"] for s in shards]))


def memory():
    """Peak RSS (getrusage), RssAnon and RssFile now (/proc/self/status), in MiB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    now = {key: int(status[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}
    return dict(peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **now)


def measure(layout, folder, num, shard_size):
    """Run in a subprocess: load the pairs, then draw one epoch of batches; print the memory at each point."""
    result = dict(start=memory())
    clock = time.perf_counter()
    pairs = load_in_ram(folder, num, shard_size) if layout == "before" else load_pairs(folder)
    result["load_s"] = time.perf_counter() - clock
    result["loaded"] = memory()
    batches = pair_batches(pairs, BATCH, seed=0, start_step=0)
    clock = time.perf_counter()
    for _ in range(num // BATCH):
        next(batches)
    result["batch_ms"] = 1000 * (time.perf_counter() - clock) / (num // BATCH)
    result["epoch"] = memory()
    print(json.dumps(result))


def noise_ms(shape, repeats=50):
    """Milliseconds of per_index_noise for one batch (one torch.Generator per row)."""
    per_index_noise(range(BATCH), shape, 0)
    clock = time.perf_counter()
    for r in range(repeats):
        per_index_noise(range(r * BATCH, (r + 1) * BATCH), shape, 0)
    return 1000 * (time.perf_counter() - clock) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100_000, help="pairs (default 100000)")
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per shard (default 1000)")
    parser.add_argument("--resolution", type=int, default=32, help="image side, 3 channels (default 32)")
    parser.add_argument("--dir", default=None, help="folder for the fake shards (default: a temp folder)")
    parser.add_argument("--measure", nargs=2, metavar=("LAYOUT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(*args.measure, args.num, args.shard_size)
    shape = (3, args.resolution, args.resolution)
    print(f"{args.num} pairs of {shape} fp32: y is {args.num * 4 * shape[0] * shape[1] * shape[2] / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        for layout in ("before", "now"):
            folder = os.path.join(tmp, layout)
            write_shards(folder, args.num, args.shard_size, shape, layout)
            out = subprocess.run([sys.executable, __file__, "--num", str(args.num), "--shard-size",
                                  str(args.shard_size), "--measure", layout, folder],
                                 capture_output=True, text=True, check=True).stdout
            rows.append((layout, json.loads(out.strip().splitlines()[-1])))
    print("| pairs | peak RSS | after loading: private / file-backed | after an epoch: private / file-backed "
          "| load | one batch of 64 |")
    print("|---|---|---|---|---|---|")
    for layout, r in rows:
        name = "in RAM (before)" if layout == "before" else "mapped shards (now)"
        print(f"| {name} | {r['epoch']['peak']:.0f} MiB | {r['loaded']['RssAnon']:.0f} / {r['loaded']['RssFile']:.0f} MiB "
              f"| {r['epoch']['RssAnon']:.0f} / {r['epoch']['RssFile']:.0f} MiB | {r['load_s']:.1f} s "
              f"| {r['batch_ms']:.1f} ms |")
    start = rows[0][1]["start"]
    print(f"| nothing loaded (python, torch, dmd_minimal) | {start['peak']:.0f} MiB | {start['RssAnon']:.0f} / "
          f"{start['RssFile']:.0f} MiB | | | |")
    print(f"per_index_noise, batch {BATCH} of {shape}: {noise_ms(shape):.2f} ms")


if __name__ == "__main__":
    main()
