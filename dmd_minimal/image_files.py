"""Image datasets stored as files, read without running code from them: items (image float32 [C, H, W]
in [-1, 1], label int64, 0-based).

- CIFAR-10's python batches, cifar-10-batches-py/data_batch_1..5 (the train split,
  https://www.cs.toronto.edu/~kriz/cifar.html); torchvision downloads them when asked.
- downsampled ImageNet (Chrabaszcz et al., arXiv 1707.08819): train_data_batch_1..10, pickles or .npz,
  each with `data` uint8 [N, 3*R*R] (channel-major rows) and `labels` 1..1000.
- an EDM dataset_tool zip or folder (arXiv 2206.00364's code): images plus dataset.json,
  {"labels": [[file, label], ...]} or {"labels": null}; 1 (gray) or 3 channels.
"""
import bisect
import io
import json
import math
import os
import pickle
import re
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

from .utils import DMDError, reason

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
NUM_CLASSES = {"cifar10": 10, "imagenet64": 1000}   # so that a subset still fits the teacher's labels
BATCH_FILE = re.compile(r"train_data_batch_(\d+)(\.npz)?$")    # downsampled ImageNet's train files
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")                   # dataset_tool writes PNG
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")                # PIL modes read as one channel; the rest as RGB
# What parsing a truncated or foreign file raises (BadZipFile and zlib.error are not OSErrors).
CORRUPT = (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
           pickle.UnpicklingError, zipfile.BadZipFile, zlib.error)


def to_unit_range(image):
    """uint8 numpy [..., C, H, W] -> float32 tensor in [-1, 1]: 0 -> -1, 255 -> 1."""
    return torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32) / 127.5 - 1


# ---- python-pickle and .npz batches (CIFAR-10, downsampled ImageNet) ---------------------------

class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and lists; any other global is refused, so no code runs."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}   # what numpy 1/2 arrays in Python 2/3 pickles refer to

    def find_class(self, module, name):
        if (module.replace("numpy._core", "numpy.core"), name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which arrays never need")
        return super().find_class(module, name)


def read_batch(path, first_label, num_classes):
    """(rows uint8 [N, C*R*R], labels int64 [N], 0-based) from one pickle or .npz batch file."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                data, labels = f["data"], f["labels"]
        else:
            with open(path, "rb") as f:
                entry = ArrayUnpickler(f, encoding="latin1").load()   # CIFAR-10's are Python 2 pickles
            data, labels = entry["data"], entry["labels"]
        data, labels = np.asarray(data), np.asarray(labels).reshape(-1)
    except CORRUPT as e:
        raise DMDError(f"{path} is corrupt or not a batch of images ({reason(e)})") from None
    if data.dtype != np.uint8 or data.ndim != 2:
        raise DMDError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, not uint8 rows [N, 3*R*R]")
    if len(labels) != len(data):
        raise DMDError(f"{path} holds {len(data)} images but {len(labels)} labels")
    last = first_label + num_classes - 1
    if len(labels) and (labels.dtype.kind not in "iu" or labels.min() < first_label or labels.max() > last):
        raise DMDError(f"{path}: labels must be integers {first_label}..{last}, "
                       f"found {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64) - first_label


class ArrayImages(torch.utils.data.Dataset):
    """Images held in memory as channel-major uint8 rows [n, 3*R*R], the layout both batch formats use."""

    def __init__(self, chunks, labels, resolution, num_classes):
        self.chunks = chunks   # one array per file: concatenating would double the peak memory
        self.starts = np.cumsum([0] + [len(c) for c in chunks]).tolist()   # [len(chunks) + 1]
        self.labels = labels   # int64 [N], 0-based
        self.resolution, self.channels, self.num_classes = resolution, 3, num_classes

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, i):
        i = range(len(self))[i]                      # negative indices; IndexError past the end
        j = bisect.bisect_right(self.starts, i) - 1  # the file holding image i
        row = self.chunks[j][i - self.starts[j]]     # [3*R*R]: R*R red, then green, then blue values
        image = row.reshape(3, self.resolution, self.resolution)   # [C, H, W]
        return to_unit_range(image), torch.tensor(self.labels[i])


def read_batches(paths, first_label, num_classes):
    """One ArrayImages from batch files, in the order given."""
    chunks, labels = zip(*(read_batch(path, first_label, num_classes) for path in paths))
    lengths = sorted({c.shape[1] for c in chunks})
    side = math.isqrt(lengths[0] // 3)
    if len(lengths) > 1 or 3 * side * side != lengths[0]:
        raise DMDError(f"rows of {lengths} values in {os.path.dirname(paths[0]) or '.'}: "
                       f"expected one length 3*R*R (RGB images R x R)")
    return ArrayImages(list(chunks), np.concatenate(labels), side, num_classes)


def load_cifar10(data_dir, download):
    """CIFAR-10's train split from data_dir/cifar-10-batches-py (or an EDM dataset at data_dir)."""
    folder = os.path.join(data_dir, CIFAR_FOLDER)
    if not os.path.isdir(folder) and is_image_dataset(data_dir):
        return ImageFolderZip(data_dir)
    paths = [os.path.join(folder, name) for name in CIFAR_TRAIN]
    if download and not all(map(os.path.isfile, paths)):
        # torchvision only fetches: its CIFAR10 class checks the md5 of both splits on every construction
        # and decodes through PIL, while these pickles are the format we read for ImageNet anyway.
        from torchvision.datasets import CIFAR10   # here, so that nothing else pays for importing it
        try:
            CIFAR10(data_dir, train=True, download=True)   # downloads, checks md5 sums, extracts
        except (OSError, RuntimeError) as e:               # urllib's errors are OSErrors
            raise DMDError(f"cannot download CIFAR-10 into {data_dir} ({reason(e)})") from None
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DMDError(f"CIFAR-10 not found: expected {folder}/data_batch_1..5 "
                       f"({missing[0]} is missing); pass --download to fetch it")
    return read_batches(paths, first_label=0, num_classes=NUM_CLASSES["cifar10"])


def load_imagenet64(data_dir):
    """Downsampled ImageNet's train_data_batch_* files (one per number), or an EDM dataset at data_dir."""
    if not os.path.exists(data_dir):
        raise DMDError(f"ImageNet 64x64 data {data_dir} does not exist")
    names = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else [os.path.basename(data_dir)]
    folder = data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir)
    found = {}   # {batch number: path}, a pickle or an npz, not both
    for match in filter(None, map(BATCH_FILE.match, names)):
        found.setdefault(int(match[1]), os.path.join(folder, match[0]))
    if found:
        paths = [found[k] for k in sorted(found)]
        return read_batches(paths, first_label=1, num_classes=NUM_CLASSES["imagenet64"])
    if is_image_dataset(data_dir):
        return ImageFolderZip(data_dir)
    raise DMDError(f"{data_dir} holds neither downsampled ImageNet files (train_data_batch_1..10, "
                   f"pickles or .npz) nor an EDM dataset (a zip or folder of PNGs with dataset.json)")


# ---- EDM's dataset_tool output: a zip or folder of images with dataset.json -------------------

def is_image_dataset(path):
    """Whether path looks like dataset_tool output: a .zip file, or a folder with images or dataset.json."""
    if os.path.isfile(path):
        return path.lower().endswith(".zip")
    return os.path.isdir(path) and any(name == "dataset.json" or name.lower().endswith(IMAGE_EXTENSIONS)
                                       for _, _, names in os.walk(path) for name in names)


class ImageFolderZip(torch.utils.data.Dataset):
    """Images of an EDM dataset zip or folder, decoded lazily; labels from dataset.json (0-based).

    Every image's header is read once here, so mixed sizes or channel counts, and files that are not
    images, fail now with the file's name rather than in the middle of training.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.zip, self.zip_pid = None, None
        if os.path.isdir(self.path):
            names = [os.path.relpath(os.path.join(root, name), self.path).replace(os.sep, "/")
                     for root, _, files in os.walk(self.path) for name in files]
        elif os.path.isfile(self.path):
            try:
                names = self.open_zip().namelist()
            except CORRUPT as e:
                raise DMDError(f"{self.path} is not a readable zip file ({reason(e)})") from None
        else:
            raise DMDError(f"dataset {self.path} does not exist")
        for name in names:
            self.check_inside(name)
        self.files = sorted(name for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise DMDError(f"{self.path} holds no images (expected dataset_tool output: PNGs, dataset.json)")
        # int64 [N], or None: EDM reads a dataset without dataset.json as unlabelled
        labels = self.read_labels() if "dataset.json" in names else None
        self.num_classes = 0 if labels is None else int(labels.max()) + 1
        self.labels = np.zeros(len(self.files), np.int64) if labels is None else labels
        self.channels, self.resolution = self.check_headers()

    def check_inside(self, name):
        """One-line error for a member whose path leaves the dataset (an absolute path, '..', a link out)."""
        inside = not (name.startswith("/") or ".." in name.split("/") or re.match(r"^[A-Za-z]:", name))
        if inside and os.path.isdir(self.path):
            root = os.path.realpath(self.path)
            inside = os.path.realpath(os.path.join(root, name)).startswith(root + os.sep)
        if not inside:
            raise DMDError(f"{self.path}: member {name} lies outside the dataset; remove it")

    def check_headers(self):
        """(channels, resolution) shared by every image, from their headers; one-line errors name the file."""
        sizes = {}   # {(channels, width, height): first file}
        for name in self.files:
            try:
                with PIL.Image.open(io.BytesIO(self.read(name))) as image:
                    key = (1 if image.mode in GRAY_MODES else 3, *image.size)
            except CORRUPT + (PIL.UnidentifiedImageError,) as e:
                raise DMDError(f"{self.path}: {name} is not a readable image ({reason(e)})") from None
            sizes.setdefault(key, name)
            if len(sizes) > 1:
                (c0, w0, h0), first = next(iter(sizes.items()))
                raise DMDError(f"{self.path}: {name} is {key[1]}x{key[2]} with {key[0]} channel(s), unlike "
                               f"{first} ({w0}x{h0}, {c0}): a dataset holds one size and channel count")
        (channels, width, height), first = next(iter(sizes.items()))
        if width != height:
            raise DMDError(f"{self.path}: images are {width}x{height} (e.g. {first}), not square")
        return channels, width

    def open_zip(self):
        # One ZipFile per process: a forked DataLoader worker must not share the parent's file offset.
        if self.zip is None or self.zip_pid != os.getpid():
            self.zip, self.zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self.zip

    def __getstate__(self):
        return dict(self.__dict__, zip=None)   # an open ZipFile cannot be pickled into a worker

    def read(self, name):
        if os.path.isdir(self.path):
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        return self.open_zip().read(name)

    def read_labels(self):
        """Labels int64 [N] in the order of self.files, or None if dataset.json says null."""
        try:
            labels = json.loads(self.read("dataset.json"))["labels"]
            labels = None if labels is None else dict(labels)   # {file: label}
        except CORRUPT as e:
            raise DMDError(f"{self.path}: dataset.json is corrupt ({reason(e)})") from None
        if labels is None:
            return None
        absent = sorted(set(labels) - set(self.files))
        if absent:
            raise DMDError(f"{self.path}: dataset.json lists {len(absent)} images that are not there, "
                           f"e.g. {absent[0]}")
        unlabelled = [name for name in self.files if name not in labels]
        if unlabelled:
            raise DMDError(f"{self.path}: {len(unlabelled)} of {len(self.files)} images have no label "
                           f"in dataset.json, e.g. {unlabelled[0]}")
        for name in self.files:
            if not isinstance(labels[name], int) or isinstance(labels[name], bool) or labels[name] < 0:
                raise DMDError(f"{self.path}: dataset.json gives {name} the label {labels[name]!r}; "
                               f"labels must be class indices 0, 1, ...")
        return np.array([labels[name] for name in self.files], np.int64)

    def load(self, i):
        """Image i as uint8 [C, H, W]."""
        try:
            with PIL.Image.open(io.BytesIO(self.read(self.files[i]))) as image:
                image = np.array(image.convert("L" if self.channels == 1 else "RGB"))
        except CORRUPT as e:
            raise DMDError(f"{self.path}: image {self.files[i]} is corrupt ({reason(e)})") from None
        image = image[:, :, None] if image.ndim == 2 else image   # [H, W, C]
        return image.transpose(2, 0, 1)                          # [C, H, W]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = self.load(i)
        if image.shape != (self.channels, self.resolution, self.resolution):
            raise DMDError(f"{self.path}: {self.files[i]} is {list(image.shape)} (C, H, W), unlike the "
                           f"first image {[self.channels, self.resolution, self.resolution]}")
        return to_unit_range(image), torch.tensor(self.labels[i])
