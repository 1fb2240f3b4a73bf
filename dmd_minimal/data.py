"""Image datasets: items (image float32 [C, H, W] in [-1, 1], label int64, 0-based).

DMD itself needs only the teacher and the regression pairs (arXiv 2311.18828, §3); images are for
training a teacher from scratch (EDM, arXiv 2206.00364) and for FID's reference statistics.
The datasets (the file formats are read by image_files.py):
- `cifar10`: CIFAR-10's python batches; `imagenet64`: downsampled ImageNet's batch files; both also
  as an EDM dataset_tool zip or folder.
- `fashion-mnist`, `mnist`: 28x28 grayscale, 10 classes, through torchvision (mnist.py); a train and a
  test split.
- `folder`: a user's own images, an EDM dataset_tool zip or folder: channels (1 or 3), resolution and
  classes come from the data.
- `shapes`: procedural coloured shapes, no files: for tutorials and tests on CPU.
`infinite_loader` yields batches forever in an order fixed by (seed, epoch): a resumed run continues it.
"""
import os

import numpy as np
import torch

from .image_files import ImageFolderZip, load_cifar10, load_imagenet64
from .mnist import TORCHVISION_CLASSES, load_mnist_like
from .utils import DMDError

DATASETS = ("cifar10", "imagenet64", "fashion-mnist", "mnist", "folder", "shapes")
# (channels, resolution, classes) of the datasets whose name fixes them; a `folder` is read to find out.
DATA_SPECS = {"cifar10": (3, 32, 10), "imagenet64": (3, 64, 1000), "fashion-mnist": (1, 28, 10),
              "mnist": (1, 28, 10)}
SHAPES = ("disc", "square", "triangle", "ring")                # the class labels of `shapes`
DATA_SPECS["shapes"] = (3, 16, len(SHAPES))
# Labelled datasets with a test split: scored in a classifier's features (classifier.py), not Inception's.
CLASSIFIER_DATASETS = tuple(TORCHVISION_CLASSES)
CLASS_NAMES = {"fashion-mnist": ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                                 "bag", "ankle boot"),   # Xiao et al., arXiv 1708.07747, Table 1
               "mnist": tuple(str(d) for d in range(10)), "shapes": SHAPES}


class Subset(torch.utils.data.Subset):
    """Some of a dataset's items (indices), with its .channels, .resolution and .num_classes."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.channels, self.resolution, self.num_classes = dataset.channels, dataset.resolution, dataset.num_classes


# ---- procedural shapes --------------------------------------------------------------------------

def shape_mask(kind, dx, dy):
    """Bool [H, W]: which pixels a shape covers, in coordinates scaled by its radius."""
    if kind == "disc":
        return dx**2 + dy**2 <= 1
    if kind == "square":
        return torch.maximum(dx.abs(), dy.abs()) <= 0.8
    if kind == "triangle":   # apex up, base at dy = 0.8
        return (dy <= 0.8) & (2 * dx.abs() <= dy + 1)
    return (dx**2 + dy**2 <= 1) & (dx**2 + dy**2 >= 0.3)   # ring


class Shapes(torch.utils.data.Dataset):
    """One shape (SHAPES, also the label) on a plain background; item i depends only on (seed, i)."""

    def __init__(self, resolution=16, size=10_000, seed=0):
        self.resolution, self.channels, self.num_classes = resolution, 3, len(SHAPES)
        self.size, self.seed = size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        i = range(self.size)[i]
        rng = np.random.default_rng([self.seed, i])   # hashes both; a torch seed keeps only 32 bits
        label = i % len(SHAPES)                                          # balanced classes
        background = torch.tensor(rng.uniform(-1, -0.4, (3, 1, 1)), dtype=torch.float32)   # dark
        colour = torch.tensor(rng.uniform(0.4, 1, (3, 1, 1)), dtype=torch.float32)         # bright
        R = self.resolution
        r = R * rng.uniform(0.2, 0.35)                                   # radius: 20-35% of the side
        cx, cy = rng.uniform(r, R - r, 2)                                # the shape stays inside
        ys, xs = torch.meshgrid(torch.arange(R) + 0.5, torch.arange(R) + 0.5, indexing="ij")   # [H, W]
        inside = shape_mask(SHAPES[label], (xs - cx) / r, (ys - cy) / r)
        return torch.where(inside, colour, background), torch.tensor(label)   # [3, H, W]


# ---- entry points -------------------------------------------------------------------------------

def load_dataset(name, data_dir=None, download=False, resolution=None, split="train"):
    """The images of `name` (DATASETS), with .resolution, .channels and .num_classes.

    num_classes is 0 for an unlabelled dataset, whose labels are then all 0. `resolution` is the side
    to check the data against (or to draw `shapes` at, default 16). For cifar10 and imagenet64,
    data_dir may also be an EDM dataset_tool zip or folder. split="test" is the held-out split of
    fashion-mnist and mnist, for evaluation; the other datasets have the train split only here.
    """
    if name not in DATASETS:
        raise DMDError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split != "train" and name not in TORCHVISION_CLASSES:
        raise DMDError(f"the {name} dataset has no {split} split here")
    if name == "shapes":
        return Shapes(resolution or 16)
    if name in TORCHVISION_CLASSES:
        dataset = load_mnist_like(name, data_dir and os.fspath(data_dir), download, split)
    elif data_dir is None:
        raise DMDError(f"the {name} dataset needs --data-dir")
    elif name == "folder":
        dataset = ImageFolderZip(data_dir)
    else:
        data_dir = os.fspath(data_dir)
        dataset = load_cifar10(data_dir, download) if name == "cifar10" else load_imagenet64(data_dir)
    if resolution and dataset.resolution != resolution:
        side = dataset.resolution
        raise DMDError(f"{data_dir} holds {side}x{side} images, not {resolution}x{resolution}: "
                       f"resize them first (e.g. EDM's dataset_tool.py --resolution)")
    return dataset


def epoch_order(n, seed, epoch, rank=0, world_size=1):
    """Indices [n // world_size] that process `rank` visits in `epoch`: its share of one permutation."""
    # numpy hashes [seed, epoch] into its state; torch's CPU generator keeps only a seed's low 32 bits.
    order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))   # [n]
    return order[rank::world_size][: n // world_size]   # every rank the same count


def batch_indices(length, batch_size, seed, start_step=0, rank=0, world_size=1):
    """Endless index batches [batch_size] into a dataset of `length` items, reshuffled each epoch from (seed, epoch).

    An epoch is the batches_per_epoch = (length // world_size) // batch_size full batches of
    epoch_order (the remainder is skipped), so batch k of a run is batch k % batches_per_epoch of epoch
    k // batches_per_epoch: a run resumed at step k passes start_step=k and sees what it would have seen.
    """
    batches_per_epoch = length // world_size // batch_size
    if batches_per_epoch == 0:
        raise DMDError(f"the dataset has {length} items, too few for a batch of {batch_size} "
                       f"on each of {world_size} processes")

    def batches(epoch, batch):
        while True:
            order = epoch_order(length, seed, epoch, rank, world_size)
            for b in range(batch, batches_per_epoch):
                yield order[b * batch_size: (b + 1) * batch_size]
            epoch, batch = epoch + 1, 0
    return batches(*divmod(start_step, batches_per_epoch))


def infinite_loader(dataset, batch_size, seed, start_step=0, rank=0, world_size=1, num_workers=0):
    """An endless iterator of (images [B, C, H, W], labels [B]) in batch_indices' order (workers decode them)."""
    batches = (b.tolist() for b in batch_indices(len(dataset), batch_size, seed, start_step, rank, world_size))
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers))
