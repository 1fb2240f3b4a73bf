"""mnist.py: Fashion-MNIST and MNIST through torchvision, from tiny IDX files written in the real format
(both layouts: the four .gz files, as Debian installs them, and torchvision's DATA_DIR/Class/raw/),
damaged files, and the real Fashion-MNIST files where they are installed."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from dmd_minimal.data import load_dataset
from dmd_minimal.mnist import DEBIAN_FOLDERS, FILES, TORCHVISION_CLASSES
from dmd_minimal.utils import DMDError

REAL = DEBIAN_FOLDERS["fashion-mnist"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))   # decompressed copies go here, not into ~


def idx_bytes(array, magic_type=0x08):
    """An IDX file: magic (0, 0, type, number of dimensions), the sizes big-endian, then the data."""
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder, n=(6, 4), compress=True, seed=0):
    """The four files of a tiny MNIST-like data set: n train and test images 28x28 with labels 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in zip(("train", "t10k"), n):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, count, dtype=np.uint8)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("layout", ["debian", "torchvision", "torchvision-gz"])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_both_layouts_read_through_torchvision(tmp_path, layout, name):
    raw = tmp_path / "data" / TORCHVISION_CLASSES[name] / "raw"   # torchvision's layout under DATA_DIR
    folder = tmp_path / "data" if layout == "debian" else raw
    arrays = write_idx(folder, compress=layout != "torchvision")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset(name, tmp_path / "data", split=split)
        assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (len(arrays[f"{prefix}-labels-idx1-ubyte"]),
                                                                         1, 28, 10)
        x, y = ds[1]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert torch.equal(x[0], torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"][1]).float() / 127.5 - 1)
        assert int(y) == arrays[f"{prefix}-labels-idx1-ubyte"][1]
    assert x.min() >= -1 and x.max() <= 1


def damage(folder, name, how):
    path = folder / f"{name}.gz"
    data = gzip.decompress(path.read_bytes())
    if how == "truncated data":
        data = data[: len(data) - 100]
    elif how == "wrong magic":
        data = b"\x00\x00\x07\x03" + data[4:]   # type 7 is no IDX type
    path.write_bytes(gzip.compress(data) if how != "truncated gzip" else path.read_bytes()[:60])


@pytest.mark.parametrize("how, message", [("truncated data", "train-images-idx3-ubyte is not a readable IDX file"),
                                          ("wrong magic", "train-images-idx3-ubyte is not a readable IDX file"),
                                          ("truncated gzip", "train-images-idx3-ubyte.gz is truncated or not gzip")])
def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, how, message):
    write_idx(tmp_path / "data")
    damage(tmp_path / "data", "train-images-idx3-ubyte", how)
    with pytest.raises(DMDError, match=message) as info:
        load_dataset("fashion-mnist", tmp_path / "data")
    assert "\n" not in str(info.value)


def test_missing_files_and_mismatched_splits(tmp_path):
    with pytest.raises(DMDError, match="fashion-mnist not found in .*train-images-idx3-ubyte.gz.*--download"):
        load_dataset("fashion-mnist", tmp_path)
    arrays = write_idx(tmp_path / "data")
    (tmp_path / "data" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(arrays["t10k-labels-idx1-ubyte"])))
    with pytest.raises(DMDError, match="6 images .* with 4 labels"):
        load_dataset("mnist", tmp_path / "data")
    with pytest.raises(DMDError, match="no test split"):
        load_dataset("shapes", split="test")


def test_decompressed_once_into_the_cache(tmp_path):
    write_idx(tmp_path / "data")
    load_dataset("mnist", tmp_path / "data")
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*-ubyte"))
    assert cached == sorted(FILES)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*-ubyte")}
    load_dataset("mnist", tmp_path / "data", split="test")
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*-ubyte")}   # not rewritten


@pytest.mark.skipif(not os.path.isdir(REAL), reason=f"Fashion-MNIST is not installed in {REAL} "
                                                    "(apt-get install dataset-fashion-mnist)")
def test_the_real_fashion_mnist_files():
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", split="test")   # default: Debian's
    assert (len(train), len(test), train.channels, train.resolution, train.num_classes) == (60000, 10000, 1, 28, 10)
    assert torch.bincount(train.labels).tolist() == [6000] * 10   # Fashion-MNIST is balanced
    assert torch.bincount(test.labels).tolist() == [1000] * 10
