"""Regression pairs (z, y): noise and the image the teacher's deterministic ODE makes from it (DMD §3.3).

Pair i uses noise seeded by (seed, i) and class label i % num_classes, so it is the same whatever the
batch size or the number of processes. The generator later regresses G(z) onto y (Eq. 9).
"""
import torch
from tqdm import tqdm

from .sampler import sample_ode
from .utils import DMDError, atomic_save, load_file, per_index_noise


@torch.no_grad()
def generate_pairs(teacher, indices, shape, seed, num_steps, batch_size=1024):
    """z, y [N, *shape] and labels [N] (None if unconditional) for the pair indices given."""
    device = next(teacher.parameters(), torch.empty(0)).device
    zs, ys, labels = [], [], []
    for start in tqdm(range(0, len(indices), batch_size), desc="pairs", mininterval=1.0):
        batch = torch.as_tensor(indices[start:start + batch_size])
        z = per_index_noise(batch, shape, seed, device)
        label = batch.to(device) % teacher.label_dim if teacher.label_dim else None
        y = sample_ode(teacher, z, num_steps, label)
        zs.append(z.cpu())
        ys.append(y.cpu())
        labels.append(None if label is None else label.cpu())
    labels = None if labels[0] is None else torch.cat(labels)
    return dict(z=torch.cat(zs), y=torch.cat(ys), labels=labels)


def save_pairs(path, pairs, seed, num_steps):
    atomic_save(dict(pairs, seed=seed, num_steps=num_steps), path)


def load_pairs(path, shape=None):
    """Pairs saved by save_pairs, checked for consistency (and sample shape, if given)."""
    pairs = load_file(path, "pairs file", required=("z", "y", "labels", "seed", "num_steps"))
    if pairs["z"].shape != pairs["y"].shape:
        raise DMDError(f"pairs file {path} is corrupt: z {tuple(pairs['z'].shape)} and y {tuple(pairs['y'].shape)} differ")
    if shape is not None and tuple(pairs["z"].shape[1:]) != tuple(shape):
        raise DMDError(f"pairs file {path} holds samples of shape {tuple(pairs['z'].shape[1:])}, "
                       f"but the teacher makes {tuple(shape)}: regenerate the pairs for this teacher")
    return pairs
