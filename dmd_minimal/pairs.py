"""Regression pairs (z, y): noise and the sample the teacher's deterministic ODE makes from it (DMD §3.3).

    python -m dmd_minimal.pairs --teacher edm-cifar10-32x32-cond-vp.pkl --out pairs/cifar10-cond --num 100000 --steps 18
    torchrun --nproc_per_node 8 -m dmd_minimal.pairs ...       # shards split across the GPUs

Pair i uses noise seeded by (seed, i) and class label i % num_classes (balanced classes), so it is the
same whatever the batch size, the number of processes or an interruption. The generator later regresses
G(z) onto y (Eq. 9). The paper makes 100k (CIFAR-10 cond) / 500k (uncond) pairs with 18 Heun steps and
25k (ImageNet-64) with 256 steps. Pairs live in a folder of shards, each written atomically: an
interrupted run keeps its finished shards and a rerun makes only the missing ones.
"""
import argparse
import json
import math
import os
import sys

import torch
from tqdm import tqdm

from .load import load_denoiser
from .networks import sample_shape
from .sampler import sample_ode
from .utils import DMDError, atomic_save, atomic_write, hide_progress, load_file, per_index_noise, reason

MANIFEST = "manifest.json"
MANIFEST_KEYS = ("count", "shape", "seed", "num_steps", "label_dim", "shard_size")


def shard_name(k):
    return f"shard-{k:05d}.pt"


@torch.no_grad()
def generate_pairs(teacher, indices, shape, seed, num_steps, batch_size=256, progress=None):
    """z, y [N, *shape] and labels [N] (None if unconditional) for the pair indices given, on the CPU."""
    device = next(teacher.parameters(), torch.empty(0)).device
    zs, ys, labels = [], [], []
    for start in range(0, len(indices), batch_size):
        batch = torch.as_tensor(indices[start:start + batch_size])
        z = per_index_noise(batch, shape, seed, device)                                   # [B, *shape]
        label = batch.to(device) % teacher.label_dim if teacher.label_dim else None      # [B]
        y = sample_ode(teacher, z, num_steps, label)                                     # [B, *shape]
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
        raise DMDError(f"pairs manifest {path} is corrupt ({problem}): delete the folder and make the pairs again")
    return manifest


def check_manifest(folder, manifest):
    """Write the manifest of a new pairs folder, or check that an existing one asks for the same pairs."""
    found = read_manifest(folder)
    if found is None:
        atomic_write(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        return
    differ = [key for key in manifest if found.get(key) != manifest[key]]
    if differ:
        held = ", ".join(f"{key}={found.get(key)}" for key in differ)
        wanted = ", ".join(f"{key}={manifest[key]}" for key in differ)
        raise DMDError(f"pairs folder {folder} holds pairs with {held}, not {wanted}: use another folder or delete it")


def make_pairs(teacher, folder, count, shape, seed, num_steps, batch_size=256, shard_size=1000,
               rank=0, world_size=1):
    """Make the missing shards of pairs 0..count-1 in `folder`; shard k is made by rank k % world_size."""
    if count < 1 or shard_size < 1 or batch_size < 1:
        raise DMDError(f"pairs need count, shard_size and batch_size >= 1, not {count}, {shard_size}, {batch_size}")
    manifest = dict(count=count, shape=list(shape), seed=seed, num_steps=num_steps,
                    label_dim=teacher.label_dim, shard_size=shard_size)
    check_manifest(folder, manifest)
    num_shards = math.ceil(count / shard_size)
    todo = [k for k in range(rank, num_shards, world_size)
            if not os.path.isfile(os.path.join(folder, shard_name(k)))]
    todo_pairs = sum(min(count, (k + 1) * shard_size) - k * shard_size for k in todo)
    with tqdm(total=todo_pairs, desc="pairs", unit="pair", disable=hide_progress(rank) or not todo,
              mininterval=1.0) as progress:
        for k in todo:
            indices = range(k * shard_size, min(count, (k + 1) * shard_size))
            shard = generate_pairs(teacher, indices, shape, seed, num_steps, batch_size, progress)
            atomic_save(dict(shard, start=indices.start), os.path.join(folder, shard_name(k)))


def load_shard(path, start, size, shape, label_dim):
    shard = load_file(path, "pairs shard", required=("z", "y", "labels", "start"))
    expected = (size, *shape)
    labels_ok = shard["labels"] is None if label_dim == 0 else tuple(shard["labels"].shape) == (size,)
    if (shard["start"] != start or tuple(shard["z"].shape) != expected or tuple(shard["y"].shape) != expected
            or not labels_ok):
        raise DMDError(f"pairs shard {path} is corrupt: it should hold pairs {start}.. of shape {expected}; "
                       f"delete it and rerun to make it again")
    return shard


def load_pairs(folder, shape=None):
    """All pairs of a finished folder: dict(z, y [N, *shape], labels [N] or None, seed, num_steps), on the CPU."""
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DMDError(f"{folder} holds no pairs (no {MANIFEST}): make them with python -m dmd_minimal.pairs")
    count, shard_size, stored_shape = manifest["count"], manifest["shard_size"], tuple(manifest["shape"])
    if shape is not None and stored_shape != tuple(shape):
        raise DMDError(f"pairs in {folder} have shape {stored_shape}, but the teacher makes {tuple(shape)}: "
                       f"make pairs for this teacher in another folder")
    paths = [os.path.join(folder, shard_name(k)) for k in range(math.ceil(count / shard_size))]
    done = sum(os.path.isfile(path) for path in paths)
    if done < len(paths):
        raise DMDError(f"pairs incomplete: {done} of {len(paths)} shards in {folder}; "
                       f"rerun the pairs command (or train) with the same settings to finish them")
    shards = [load_shard(path, k * shard_size, min(count, (k + 1) * shard_size) - k * shard_size,
                         stored_shape, manifest["label_dim"])
              for k, path in enumerate(paths)]
    labels = None if manifest["label_dim"] == 0 else torch.cat([shard["labels"] for shard in shards])
    return dict(z=torch.cat([shard["z"] for shard in shards]), y=torch.cat([shard["y"] for shard in shards]),
                labels=labels, seed=manifest["seed"], num_steps=manifest["num_steps"])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dmd_minimal.pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher file or URL (anything load_denoiser reads)")
    parser.add_argument("--out", required=True, help="folder for the shards (a rerun finishes an interrupted one)")
    parser.add_argument("--num", type=int, required=True, help="number of pairs (paper: 100000 / 500000 / 25000)")
    parser.add_argument("--steps", type=int, required=True, help="Heun steps (paper: 18 CIFAR-10, 256 ImageNet-64)")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per teacher call (default 256)")
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per shard file (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    args = parser.parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))   # set by torchrun
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        teacher = load_denoiser(args.teacher).to(device)
        make_pairs(teacher, args.out, args.num, sample_shape(teacher), args.seed, args.steps,
                   args.batch_size, args.shard_size, rank, world_size)
        print(f"rank {rank}: pairs 0..{args.num - 1} of {world_size} process(es) are in {args.out}")
    except DMDError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
