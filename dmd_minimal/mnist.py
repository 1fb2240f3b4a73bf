"""MNIST and Fashion-MNIST (28x28 grayscale, 10 classes) through torchvision's dataset classes.

LeCun et al. 1998 (http://yann.lecun.com/exdb/mnist/); Xiao et al., arXiv 1708.07747 (Fashion-MNIST).
Both ship as four IDX files, `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`. DATA_DIR may hold them
in torchvision's layout (DATA_DIR/FashionMNIST/raw/, what `--download` makes) or as the four .gz files
themselves, as Debian's dataset-fashion-mnist package installs them in /usr/share/datasets/fashion-mnist.
torchvision reads only the decompressed files, so .gz files found elsewhere are decompressed once into
a cache folder (utils.cache_dir()) keyed by their path, size and time.
"""
import gzip
import hashlib
import os
import shutil
import zlib

import torch

from .utils import DMDError, atomic_write, cache_dir, reason

TORCHVISION_CLASSES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
DEBIAN_FOLDERS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}   # apt-get install dataset-fashion-mnist
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FILES = [name for pair in SPLIT_FILES.values() for name in pair]
# What torchvision's IDX reader raises on a foreign or truncated file (it checks with assert).
IDX_ERRORS = (AssertionError, KeyError, RuntimeError, ValueError, IndexError, OSError)


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory: uint8 [N, C, H, W] and labels int64 [N]; items in [-1, 1] as data.py gives them."""

    def __init__(self, images, labels, num_classes):
        self.images, self.labels = images, labels
        self.channels, self.resolution = images.shape[1], images.shape[2]
        self.num_classes = num_classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1, self.labels[i]


def default_data_dir(name):
    """Where `name` is looked for without --data-dir: Debian's folder when it is installed."""
    folder = DEBIAN_FOLDERS.get(name)
    return folder if folder and os.path.isdir(folder) else None


def decompress(gz_path, path):
    """gz_path's content into path, atomically; a damaged .gz is a one-line error naming it."""
    def write(f):
        with gzip.open(gz_path, "rb") as source:
            shutil.copyfileobj(source, f)
    try:
        atomic_write(path, write)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DMDError(f"{gz_path} is truncated or not gzip ({reason(e)}): download it again") from None


def torchvision_root(name, data_dir):
    """A root folder whose <Class>/raw/ holds the four decompressed IDX files of data_dir, or None."""
    raw_name = TORCHVISION_CLASSES[name]
    raw = os.path.join(data_dir, raw_name, "raw")
    if all(os.path.isfile(os.path.join(raw, f)) for f in FILES):
        return data_dir                                        # torchvision's own layout
    for folder in (raw, data_dir):
        gz = [os.path.join(folder, f + ".gz") for f in FILES]
        if all(map(os.path.isfile, gz)):
            stamp = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime) for p in gz]
            root = os.path.join(cache_dir(), f"{raw_name}-{hashlib.sha256(repr(stamp).encode()).hexdigest()[:12]}")
            for f, path in zip(FILES, gz):
                target = os.path.join(root, raw_name, "raw", f)
                if not os.path.isfile(target):
                    decompress(path, target)
            return root
    return None


def load_mnist_like(name, data_dir=None, download=False, split="train"):
    """The `split` ("train" or "test") of fashion-mnist or mnist: TensorImages [N, 1, 28, 28], 10 classes."""
    import torchvision   # here: importing it takes seconds
    data_dir = data_dir or default_data_dir(name)
    cls = getattr(torchvision.datasets, TORCHVISION_CLASSES[name])
    if data_dir is None:
        install = " (or apt-get install dataset-fashion-mnist)" if name in DEBIAN_FOLDERS else ""
        raise DMDError(f"the {name} dataset needs --data-dir DIR with its four IDX files, "
                       f"or --data-dir DIR --download{install}")
    root = torchvision_root(name, data_dir)
    if root is None and download:
        try:
            cls(data_dir, train=True, download=True)   # fetches and checks the md5 sums of all four files
        except (OSError, RuntimeError) as e:
            raise DMDError(f"cannot download {name} into {data_dir} ({reason(e)})") from None
        root = data_dir
    if root is None:
        raise DMDError(f"{name} not found in {data_dir}: expected {', '.join(f + '.gz' for f in FILES)} there or "
                       f"in {os.path.join(data_dir, TORCHVISION_CLASSES[name], 'raw')}; pass --download to fetch them")
    try:
        dataset = cls(root, train=split == "train")
    except IDX_ERRORS:
        raise DMDError(bad_idx_file(root, cls, split)) from None
    images, labels = dataset.data, dataset.targets   # uint8 [N, 28, 28], int64 [N]
    if images.ndim != 3 or len(images) != len(labels) or labels.min() < 0 or labels.max() >= len(cls.classes):
        raise DMDError(f"{name} in {data_dir}: {len(images)} images {list(images.shape[1:])} with "
                       f"{len(labels)} labels: the {split} files do not belong together")
    return TensorImages(images[:, None].contiguous(), labels, len(cls.classes))


def bad_idx_file(root, cls, split):
    """The message naming which of a split's IDX files torchvision could not read, and why."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    folder = os.path.join(root, cls.__name__, "raw")
    for f in SPLIT_FILES[split]:
        try:
            read_sn3_pascalvincent_tensor(os.path.join(folder, f))
        except IDX_ERRORS as e:
            why = reason(e) if not isinstance(e, AssertionError) else "a wrong magic number or a truncated file"
            return f"{os.path.join(folder, f)} is not a readable IDX file ({why}): download it again"
    return f"the {split} files in {folder} do not belong together"

