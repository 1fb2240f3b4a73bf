"""Regression pairs (z, y): noise and the sample the teacher's deterministic ODE makes from it (DMD §3.3).

    python -m dmd_minimal.pairs --teacher edm-cifar10-32x32-cond-vp.pkl --out pairs/cifar10-cond --num 100000 --steps 18
    torchrun --nproc_per_node 8 -m dmd_minimal.pairs ...       # the missing pairs split evenly across the GPUs

Pair i uses noise seeded by (seed, i) and class label i % num_classes (balanced classes), so it is the
same whatever the batch size, the number of processes or an interruption. The generator later regresses
G(z) onto y (Eq. 9). The paper makes 100k (CIFAR-10 cond) / 500k (uncond) pairs with 18 Heun steps and
25k (ImageNet-64) with 256 steps. Pairs live in a folder of shards, each written atomically with a
checksum: an interrupted run keeps its finished shards and a rerun makes only the missing pairs. Each
process makes an equal share (+-1 pair) of the missing pairs, so none waits long for another; where a
share cuts a shard, its piece is a file of its own (shard-K-START-STOP.pt beside whole shards shard-K.pt). The
shards hold y alone: z and the label follow from i and are made again when a batch needs them, and y is
mapped from disk, so processes share the page cache instead of each holding every pair. The manifest
records the teacher (networks.denoiser_hash) and the sampler's settings: pairs of another teacher are
never reused.
"""
import argparse
import bisect
import json
import math
import os
import re
import sys

import torch
from tqdm import tqdm

from . import dist
from .load import load_denoiser
from .networks import denoiser_hash, sample_shape
from .sampler import sample_ode
from .utils import DMDError, atomic_save, atomic_write, check_at_least, check_option, hide_progress, load_file, per_index_noise, reason

MANIFEST = "manifest.json"
SAMPLER_KEYS = ("num_steps", "solver", "sigma_min", "sigma_max", "rho")   # sample_ode's settings
PROVENANCE_KEYS = ("teacher", *SAMPLER_KEYS)   # what made the pairs; teacher_path only names the teacher
MANIFEST_KEYS = ("count", "shape", "seed", "label_dim", "shard_size", *PROVENANCE_KEYS, "teacher_path")


SHARD_FILE = re.compile(r"shard-(\d+)(?:-(\d+)-(\d+))?\.pt")   # a whole shard K, or pairs START..STOP-1 of it


def shard_name(k, start=None, stop=None):
    """shard-K.pt for the whole shard k, shard-K-START-STOP.pt for the piece of it holding pairs start..stop-1."""
    return f"shard-{k:05d}.pt" if start is None else f"shard-{k:05d}-{start}-{stop}.pt"


def stored_ranges(folder, count, shard_size):
    """{file name: (start, stop)} of the pair files in folder, in order of start."""
    ranges = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = SHARD_FILE.fullmatch(name)
        if match and match.group(2) is None:
            k = int(match.group(1))
            ranges[name] = (k * shard_size, min(count, (k + 1) * shard_size))
        elif match:
            ranges[name] = (int(match.group(2)), int(match.group(3)))
    return dict(sorted(ranges.items(), key=lambda item: item[1]))


def missing_pairs(folder, count, shard_size):
    """The indices [M] of the pairs no file in folder holds yet."""
    done = torch.zeros(count, dtype=torch.bool)
    for start, stop in stored_ranges(folder, count, shard_size).values():
        done[start:stop] = True
    return (~done).nonzero().flatten()


def pieces(indices, shard_size):
    """Split sorted pair indices into runs of consecutive ones that stay inside one shard: (k, start, stop)."""
    runs, start, listed = [], None, indices.tolist()
    for i, j in zip(listed, listed[1:] + [None]):
        start = i if start is None else start
        if j != i + 1 or j % shard_size == 0:   # a gap or a shard boundary ends the run
            runs.append((start // shard_size, start, i + 1))
            start = None
    return runs


def heun_sampler(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The settings of the ODE that makes the pairs: deterministic Heun (DMD §3.3) on EDM's Karras schedule."""
    return dict(num_steps=num_steps, solver="heun", sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)


def pairs_manifest(teacher, count, seed, sampler, shard_size=1000, teacher_path=""):
    """What a pairs folder holds: `count` pairs from the teacher (its hash; teacher_path for messages) and sampler."""
    return dict(count=count, shape=list(sample_shape(teacher)), seed=seed, label_dim=teacher.label_dim,
                shard_size=shard_size, teacher=denoiser_hash(teacher), teacher_path=teacher_path, **sampler)


def describe(values, keys):
    """'teacher 1a2b3c4d5e6f (runs/x/teacher.pt), num_steps=18': the values of keys, for a one-line error."""
    return ", ".join(f"teacher {values.get('teacher')} ({values.get('teacher_path') or 'path unknown'})"
                     if key == "teacher" else f"{key}={values.get(key)}" for key in keys)


@torch.no_grad()
def generate_pairs(teacher, indices, shape, seed, num_steps, batch_size=256, progress=None, **schedule):
    """z, y [N, *shape] and labels [N] (None if unconditional) for the pair indices given, on the CPU.

    schedule: sample_ode's solver, sigma_min, sigma_max and rho (default: Heun on EDM's schedule).
    """
    device = next(teacher.parameters(), torch.empty(0)).device
    zs, ys, labels = [], [], []
    for start in range(0, len(indices), batch_size):
        batch = torch.as_tensor(indices[start:start + batch_size])
        z = per_index_noise(batch, shape, seed, device)                                   # [B, *shape]
        label = batch.to(device) % teacher.label_dim if teacher.label_dim else None      # [B]
        y = sample_ode(teacher, z, num_steps, label, **schedule)                         # [B, *shape]
        zs.append(z.cpu())
        ys.append(y.cpu())
        labels.append(None if label is None else label.cpu())
        if progress is not None:
            progress.update(len(batch))
    labels = None if labels[0] is None else torch.cat(labels)
    return dict(z=torch.cat(zs), y=torch.cat(ys), labels=labels)


def read_manifest(folder):
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        missing = [key for key in MANIFEST_KEYS if key not in manifest]
        problem = f"it lacks {', '.join(missing)}" if missing else None
    except (OSError, ValueError, TypeError) as e:
        problem = reason(e)
    if problem:
        raise DMDError(f"pairs manifest {path} is corrupt or from an older version ({problem}): "
                       f"delete {folder} and make the pairs again")
    return manifest


def check_manifest(folder, manifest, fix=""):
    """Write the manifest of a new pairs folder, or check that an existing one holds the same pairs.

    fix: the advice of the error (default: another --out, or delete the folder).
    """
    found = read_manifest(folder)
    if found is None:
        atomic_write(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        return
    differ = [key for key in manifest if key != "teacher_path" and found.get(key) != manifest[key]]
    if differ:
        fix = fix or f"use another --out, or delete {folder} to make them again"
        raise DMDError(f"pairs folder {folder} holds pairs with {describe(found, differ)}, "
                       f"not {describe(manifest, differ)}: {fix}")


def make_pairs(teacher, folder, manifest, batch_size=256, rank=0, world_size=1):
    """Make the pairs that manifest (pairs_manifest) asks for and folder lacks: this process's equal share of them.

    Returns the number of pairs this process made.
    """
    count, shard_size = manifest["count"], manifest["shard_size"]
    if count < 1 or shard_size < 1 or batch_size < 1:
        raise DMDError(f"pairs need count, shard_size and batch_size >= 1, not {count}, {shard_size}, {batch_size}")
    check_manifest(folder, manifest)
    missing = missing_pairs(folder, count, shard_size)
    dist.barrier()   # every process has listed the folder before any writes into it
    mine = missing.tensor_split(world_size)[rank]   # contiguous shares whose sizes differ by one at most
    sampler = {key: manifest[key] for key in SAMPLER_KEYS}
    with tqdm(total=len(mine), desc="pairs", unit="pair", disable=hide_progress(rank) or not len(mine),
              mininterval=1.0) as progress:
        for k, start, stop in pieces(mine, shard_size):
            shard = generate_pairs(teacher, range(start, stop), tuple(manifest["shape"]), manifest["seed"],
                                   batch_size=batch_size, progress=progress, **sampler)
            whole = (start, stop) == (k * shard_size, min(count, (k + 1) * shard_size))
            name = shard_name(k) if whole else shard_name(k, start, stop)
            atomic_save(dict(y=shard["y"], start=start), os.path.join(folder, name))
    return len(mine)


def load_shard(path, start, size, shape):
    """Shard y [size, *shape], mapped from disk and checked against its checksum."""
    shard = load_file(path, "pairs shard", required=("y", "start"), fix="delete it and rerun: it will be made again",
                      mmap=True)
    if shard["start"] != start or tuple(shard["y"].shape) != (size, *shape):
        raise DMDError(f"pairs shard {path} is corrupt: it should hold pairs {start}.. of shape {(size, *shape)}; "
                       f"delete it and rerun to make it again")
    return shard["y"]


class Rows:
    """rows[index] (an index tensor, a list or a slice) of a [N, ...] array made on demand by fetch(indices [B]),
    never all in memory."""

    def __init__(self, shape, fetch):
        self.shape, self.fetch = tuple(shape), fetch

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        return self.fetch(torch.arange(len(self))[index])


def load_pairs(folder, shape=None):
    """The pairs of a finished folder: dict(z, y [N, *shape] as Rows, labels [N] or None, manifest), on the CPU.

    pairs["y"][i] gathers rows of the mapped shards, pairs["z"][i] makes the noise again from (seed, i).
    """
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DMDError(f"{folder} holds no pairs (no {MANIFEST}): make them with python -m dmd_minimal.pairs")
    count, shard_size, stored_shape = manifest["count"], manifest["shard_size"], tuple(manifest["shape"])
    if shape is not None and stored_shape != tuple(shape):
        raise DMDError(f"pairs in {folder} have shape {stored_shape}, but the teacher makes {tuple(shape)}: "
                       f"make pairs for this teacher in another folder")
    ranges = stored_ranges(folder, count, shard_size)
    held = sum(stop - start for start, stop in ranges.values())
    if held < count:
        raise DMDError(f"pairs incomplete: {held} of {count} pairs in {folder}; "
                       f"rerun the pairs command (or train) with the same settings to finish them")
    starts, stops = [a for a, _ in ranges.values()], [b for _, b in ranges.values()]
    if starts[0] != 0 or stops[-1] != count or starts[1:] != stops[:-1]:   # pieces that overlap or leave a gap
        raise DMDError(f"pairs folder {folder} holds shards that overlap ({', '.join(ranges)}): "
                       f"delete {folder} and make the pairs again")
    ys = [load_shard(os.path.join(folder, name), start, stop - start, stored_shape)
          for name, (start, stop) in ranges.items()]

    def gather(i):   # [B, *shape]: row j from the file whose range holds it
        files = [bisect.bisect_right(starts, j) - 1 for j in i.tolist()]
        return torch.stack([ys[f][j - starts[f]] for f, j in zip(files, i.tolist())])
    every = (count, *stored_shape)
    y = Rows(every, gather)                                                                             # [B, *shape]
    z = Rows(every, lambda i: per_index_noise(i, stored_shape, manifest["seed"]))                       # [B, *shape]
    labels = torch.arange(count) % manifest["label_dim"] if manifest["label_dim"] else None
    return dict(z=z, y=y, labels=labels, manifest=manifest)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dmd_minimal.pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher file or URL (anything load_denoiser reads)")
    parser.add_argument("--out", required=True, help="folder for the shards (a rerun finishes an interrupted one)")
    parser.add_argument("--num", type=int, required=True, help="number of pairs (paper: 100000 / 500000 / 25000)")
    parser.add_argument("--steps", type=int, required=True, help="Heun steps (paper: 18 CIFAR-10, 256 ImageNet-64)")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per teacher call (default 256)")
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per shard file (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--sigma-min", type=float, default=0.002, help="smallest noise level (default 0.002)")
    parser.add_argument("--sigma-max", type=float, default=80.0, help="largest noise level (default 80)")
    parser.add_argument("--rho", type=float, default=7.0, help="Karras schedule curvature (default 7)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    args = parser.parse_args(argv)
    try:
        check_at_least(args, dict(num=1, steps=1, batch_size=1, shard_size=1, seed=0))   # --steps 0: targets all 0
        for flag in ("sigma_min", "rho"):
            check_option(math.isfinite(getattr(args, flag)) and getattr(args, flag) > 0, "--" + flag.replace("_", "-"),
                         getattr(args, flag), "> 0")
        check_option(args.sigma_max > args.sigma_min, "--sigma-max", args.sigma_max, f"> --sigma-min {args.sigma_min}")
        rank, world_size, device = dist.setup(args.device or "")   # torchrun: one process per GPU
        teacher = load_denoiser(args.teacher).to(device)
        manifest = pairs_manifest(teacher, args.num, args.seed, heun_sampler(args.steps, args.sigma_min,
                                  args.sigma_max, args.rho), args.shard_size, args.teacher)
        made = make_pairs(teacher, args.out, manifest, args.batch_size, rank, world_size)
        print(f"process {rank} of {world_size}: made {made} pairs into {args.out}")
    except DMDError as e:
        sys.exit(f"error: {e}")
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
