"""data.py and image_files.py against tiny files written in each real format: CIFAR-10's python batches,
downsampled ImageNet's pickles and .npz files, EDM's dataset_tool zip and folder; plus errors and the
loader's order."""
import io
import json
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from dmd_minimal.data import Shapes, epoch_order, infinite_loader, load_dataset
from dmd_minimal.image_files import ImageFolderZip, to_unit_range
from dmd_minimal.utils import DMDError


def rows(n, side, seed=0):
    """Random uint8 rows [n, 3*side*side], the layout of both batch formats."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * side * side), dtype=np.uint8)


def write_cifar(root, per_batch=3):
    """A cifar-10-batches-py folder as the release lays it out: Python 2 era pickles (protocol 2)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        entry = {"batch_label": name, "data": rows(per_batch, 32, seed=k),
                 "labels": [(k + j) % 10 for j in range(per_batch)], "filenames": ["x.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                            "ship", "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_imagenet(path, data, labels):
    """A downsampled-ImageNet batch: .npz by name, else a pickle (as Python 3 writes it)."""
    entry = {"data": data, "labels": list(labels), "mean": data.mean(0)}
    if path.suffix == ".npz":
        np.savez(path, **entry)
    else:
        path.write_bytes(pickle.dumps(entry))


def png_bytes(image):
    """uint8 [H, W, C] -> PNG file contents."""
    out = io.BytesIO()
    PIL.Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def write_edm(path, images, labels, kind="zip", extra=None):
    """dataset_tool's layout: 00000/img00000000.png ... plus dataset.json; a zip or a folder."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]   # as dataset_tool names them
    files = {name: png_bytes(image) for name, image in zip(names, images)}
    pairs = None if labels is None else [[name, int(y)] for name, y in zip(names, labels)]
    files["dataset.json"] = json.dumps({"labels": pairs}).encode()
    files.update(extra or {})
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)


def test_pixel_mapping_is_exact():
    x = to_unit_range(np.array([0, 255, 51, 204], np.uint8))
    assert x.dtype == torch.float32
    assert x.tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1, 204 / 127.5 - 1], abs=1e-7)
    assert x[0] == -1 and x[1] == 1


# Our reader opens CIFAR-10's pickles itself; torchvision's CIFAR10 class is only used to download,
# because its constructor checks the md5 sums of the real release's files, which tiny test files
# cannot (and should not be faked to) match. The folder below has the release's exact layout.
def test_cifar10_python_batches(tmp_path):
    folder = write_cifar(tmp_path)
    ds = load_dataset("cifar10", tmp_path, download=True, resolution=32)   # present: nothing fetched
    assert (len(ds), ds.resolution, ds.channels, ds.num_classes) == (15, 32, 3, 10)
    batch = pickle.loads((folder / "data_batch_2").read_bytes())
    image, label = ds[3]   # the first image of data_batch_2
    assert image.dtype == torch.float32 and label.dtype == torch.int64
    assert label == batch["labels"][0]   # CIFAR-10's labels are already 0-based
    expected = torch.from_numpy(batch["data"][0].reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1
    assert torch.equal(image, expected)
    assert all(ds[i][1] < 10 for i in range(len(ds)))   # test_batch (labels from 5) is not read


def test_cifar10_missing_says_where_and_how(tmp_path):
    with pytest.raises(DMDError, match=r"cifar-10-batches-py.*--download"):
        load_dataset("cifar10", tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["train_data_batch_1", "train_data_batch_1.npz"])
def test_imagenet64_real_rows_are_channel_major(tmp_path, name):
    # The release's row: 4096 red values row by row, then 4096 green, then 4096 blue.
    y, x = np.mgrid[0:64, 0:64]
    images = [np.concatenate([4 * x.ravel(), 4 * y.ravel(), np.full(4096, 10 * k)]) for k in range(3)]
    write_imagenet(tmp_path / name, np.stack(images).astype(np.uint8), [1, 1000, 7])
    ds = load_dataset("imagenet64", tmp_path, resolution=64)
    assert (len(ds), ds.resolution, ds.channels, ds.num_classes) == (3, 64, 3, 1000)
    for k, label in enumerate([0, 999, 6]):   # 1-based in the file
        image, y_k = ds[k]
        assert y_k == label and image.shape == (3, 64, 64)
        assert torch.equal(image[0], to_unit_range(4 * x.astype(np.uint8)))   # red varies along a row
        assert torch.equal(image[1], to_unit_range(4 * y.astype(np.uint8)))   # green down a column
        assert torch.all(image[2] == 10 * k / 127.5 - 1)


def test_imagenet_batches_in_numeric_order_small_side(tmp_path):
    # Pickles and npz mixed; batch 10 sorts after batch 2. An 8x8 side is read from the row length.
    for number, suffix in [(1, ""), (2, ".npz"), (10, "")]:
        write_imagenet(tmp_path / f"train_data_batch_{number}{suffix}", rows(2, 8, seed=number), [number] * 2)
    (tmp_path / "val_data.npz").write_bytes(b"not read")
    ds = load_dataset("imagenet64", tmp_path)
    assert (len(ds), ds.resolution) == (6, 8)
    assert [int(ds[i][1]) for i in range(6)] == [0, 0, 1, 1, 9, 9]
    assert torch.equal(ds[-1][0], to_unit_range(rows(2, 8, seed=10)[1].reshape(3, 8, 8)))
    single = load_dataset("imagenet64", tmp_path / "train_data_batch_2.npz")
    assert len(single) == 2


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_edm_dataset(tmp_path, kind):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 128]
    path = tmp_path / ("ds.zip" if kind == "zip" else "ds")
    write_edm(path, images, [3, 0, 1, 2, 3], kind)
    for name in ["imagenet64", "cifar10"]:   # dataset_tool output is accepted under any name
        ds = load_dataset(name, path, resolution=8)
        assert (len(ds), ds.resolution, ds.channels, ds.num_classes) == (5, 8, 3, 4)
    image, label = ds[0]
    assert label == 3 and image.dtype == torch.float32
    assert image[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-7)
    assert torch.equal(image, to_unit_range(images[0].transpose(2, 0, 1)))
    assert torch.equal(pickle.loads(pickle.dumps(ds))[4][0], ds[4][0])   # as DataLoader workers get it


def test_edm_unlabelled_and_grayscale(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    write_edm(tmp_path / "ds.zip", images, None)
    ds = ImageFolderZip(tmp_path / "ds.zip")
    assert (ds.num_classes, ds.channels, int(ds[2][1])) == (0, 1, 0)
    assert torch.equal(ds[2][0], to_unit_range(images[2][None]))


def test_zip_through_worker_processes(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    write_edm(tmp_path / "ds.zip", images, list(range(8)))
    ds = ImageFolderZip(tmp_path / "ds.zip")
    loader = infinite_loader(ds, batch_size=4, seed=1, num_workers=2)
    seen = torch.cat([next(loader)[1] for _ in range(2)])
    assert sorted(seen.tolist()) == list(range(8))   # one epoch: every image once


def corrupt_cases(tmp_path):
    """(name, path, resolution, what the message must say), one per kind of bad input."""
    cases = {}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("nothing here")
    cases["unrecognised folder"] = ("imagenet64", tmp_path / "empty", None, "neither")
    cases["missing folder"] = ("imagenet64", tmp_path / "nowhere", None, "does not exist")
    cases["missing zip"] = ("cifar10", tmp_path / "nowhere.zip", None, "CIFAR-10 not found")
    for name, suffix in [("pickle", ""), ("npz", ".npz")]:
        folder = tmp_path / f"truncated_{name}"
        folder.mkdir()
        write_imagenet(folder / f"train_data_batch_1{suffix}", rows(4, 8), [1] * 4)
        data = (folder / f"train_data_batch_1{suffix}").read_bytes()
        (folder / f"train_data_batch_1{suffix}").write_bytes(data[: len(data) // 2])
        cases[f"truncated {name}"] = ("imagenet64", folder, None, "corrupt")
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    cases["bad zip"] = ("imagenet64", tmp_path / "bad.zip", None, "not a readable zip")
    images = np.zeros((3, 8, 8, 3), np.uint8)
    listed = [[f"00000/img{i:08d}.png", 0] for i in range(3)] + [["00000/gone.png", 0]]
    write_edm(tmp_path / "listed.zip", images, None, extra={"dataset.json": json.dumps({"labels": listed}).encode()})
    cases["listed image missing"] = ("imagenet64", tmp_path / "listed.zip", None, "not there.*gone.png")
    write_edm(tmp_path / "unlabelled.zip", images, [0, 1, 2], extra={"00000/img00000003.png": png_bytes(images[0])})
    cases["image without label"] = ("imagenet64", tmp_path / "unlabelled.zip", None, "1 of 4 images have no label")
    write_edm(tmp_path / "json.zip", images, None, extra={"dataset.json": b"{not json"})
    cases["corrupt json"] = ("imagenet64", tmp_path / "json.zip", None, "dataset.json is corrupt")
    write_edm(tmp_path / "small.zip", images, [0, 1, 2])
    cases["resolution"] = ("imagenet64", tmp_path / "small.zip", 64, "8x8 images, not 64x64")
    (tmp_path / "counts").mkdir()
    write_imagenet(tmp_path / "counts" / "train_data_batch_1.npz", rows(4, 8), [1, 2, 3])
    cases["label count"] = ("imagenet64", tmp_path / "counts", None, "4 images but 3 labels")
    (tmp_path / "zero").mkdir()
    write_imagenet(tmp_path / "zero" / "train_data_batch_1", rows(2, 8), [0, 1])
    cases["0 in 1-based labels"] = ("imagenet64", tmp_path / "zero", None, "integers 1..1000, found 0..1")
    (tmp_path / "rowlen").mkdir()
    write_imagenet(tmp_path / "rowlen" / "train_data_batch_1", np.zeros((2, 100), np.uint8), [1, 2])
    cases["row length"] = ("imagenet64", tmp_path / "rowlen", None, "3\\*R\\*R")
    cases["unknown name"] = ("svhn", tmp_path, None, "unknown dataset 'svhn'")
    return cases


def test_errors_are_one_line_dmd_errors(tmp_path):
    for case, (name, path, resolution, message) in corrupt_cases(tmp_path).items():
        with pytest.raises(DMDError, match=message) as info:
            load_dataset(name, path, resolution=resolution)
        assert "\n" not in str(info.value), case


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))
    (tmp_path / "train_data_batch_1").write_bytes(pickle.dumps({"data": Evil(), "labels": [1]}))
    with pytest.raises(DMDError, match="builtins.print"):
        load_dataset("imagenet64", tmp_path)


def test_bad_images_fail_when_the_dataset_is_opened(tmp_path):
    """Every header is read up front: the error names the file, before any training starts."""
    images = np.zeros((2, 8, 8, 3), np.uint8)
    cases = {"truncated": ({"00000/img00000002.png": b"\x89PNG truncated"}, "img00000002.png is not a readable image"),
             "size": ({"00000/img00000002.png": png_bytes(np.zeros((4, 4, 3), np.uint8))},
                      "img00000002.png is 4x4 with 3 channel.*unlike 00000/img00000000.png \\(8x8, 3\\)"),
             "channels": ({"00000/img00000002.png": png_bytes(np.zeros((8, 8), np.uint8))},
                          "img00000002.png is 8x8 with 1 channel"),
             "not an image": ({"00000/notes.png": b"plain text, not a PNG"}, "notes.png is not a readable image"),
             "outside": ({"../escape.png": png_bytes(images[0])}, "member ../escape.png lies outside")}
    for case, (extra, message) in cases.items():
        write_edm(tmp_path / f"{case}.zip", images, None, extra=extra)
        with pytest.raises(DMDError, match=message) as info:
            load_dataset("folder", tmp_path / f"{case}.zip")
        assert "\n" not in str(info.value), case


def test_a_link_out_of_a_folder_is_refused(tmp_path):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    write_edm(tmp_path / "ds", images, None, kind="folder")
    (tmp_path / "secret.png").write_bytes(png_bytes(images[0]))
    (tmp_path / "ds" / "00000" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(DMDError, match="link.png lies outside"):
        load_dataset("folder", tmp_path / "ds")


def test_labels_out_of_range_name_the_file(tmp_path):
    images = np.zeros((2, 8, 8), np.uint8)
    for label in (-1, 1.5, True):
        labels = [[f"00000/img{i:08d}.png", label if i else 0] for i in range(2)]
        write_edm(tmp_path / "ds.zip", images, None, extra={"dataset.json": json.dumps({"labels": labels}).encode()})
        with pytest.raises(DMDError, match=f"img00000001.png the label {label!r}"):
            load_dataset("folder", tmp_path / "ds.zip")


@pytest.mark.parametrize("channels, labels", [(1, None), (3, [0, 2, 1, 2])])
def test_folder_dataset_takes_its_shape_from_the_data(tmp_path, channels, labels):
    """A user's own images: 1-channel unlabelled, 3-channel with dataset.json labels; nothing assumes RGB."""
    shape = (4, 12, 12) if channels == 1 else (4, 12, 12, 3)
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    write_edm(tmp_path / "ds.zip", images, labels)
    ds = load_dataset("folder", tmp_path / "ds.zip")
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (4, channels, 12, 0 if labels is None else 3)
    x, y = ds[3]
    assert x.shape == (channels, 12, 12) and int(y) == (0 if labels is None else 2)
    expected = images[3][None] if channels == 1 else images[3].transpose(2, 0, 1)
    assert torch.equal(x, to_unit_range(expected))


def test_shapes_are_deterministic_and_labelled():
    ds = load_dataset("shapes", None, resolution=12)
    assert (ds.resolution, ds.channels, ds.num_classes) == (12, 3, 4)
    again = Shapes(resolution=12)
    for i in range(8):
        image, label = ds[i]
        assert image.shape == (3, 12, 12) and label == i % 4
        assert torch.equal(image, again[i][0])
        assert image.min() >= -1 and image.max() <= 1
        bright = (image.mean(0) > -0.2).sum()   # shape pixels (in [0.4, 1]) against a dark background
        assert 4 <= bright < 12 * 12 / 2
    assert not torch.equal(ds[0][0], Shapes(resolution=12, seed=1)[0][0])


def batches(loader, n):
    return [next(loader)[0].clone() for _ in range(n)]


def test_loader_order_is_reproducible_and_resumable():
    ds = torch.utils.data.TensorDataset(torch.arange(22))   # 5 batches of 4 per epoch, 2 left over
    run = batches(infinite_loader(ds, 4, seed=3), 12)
    assert all(torch.equal(a, b) for a, b in zip(run, batches(infinite_loader(ds, 4, seed=3), 12)))
    resumed = batches(infinite_loader(ds, 4, seed=3, start_step=7), 5)   # mid-epoch 1
    assert all(torch.equal(a, b) for a, b in zip(run[7:], resumed))
    epoch0, epoch1 = torch.cat(run[:5]), torch.cat(run[5:10])
    assert len(set(epoch0.tolist())) == 20 and not torch.equal(epoch0, epoch1)   # no repeats, reshuffled
    assert torch.equal(epoch0, epoch_order(22, 3, 0)[:20])
    other = batches(infinite_loader(ds, 4, seed=4), 5)
    assert not all(torch.equal(a, b) for a, b in zip(run, other))


def test_loader_ranks_share_out_each_epoch():
    ds = torch.utils.data.TensorDataset(torch.arange(21))
    shards = [torch.cat(batches(infinite_loader(ds, 5, seed=0, rank=r, world_size=2), 2)) for r in range(2)]
    assert len(set(torch.cat(shards).tolist())) == 20   # disjoint, 10 each
    with pytest.raises(DMDError, match="too few"):
        infinite_loader(ds, 8, seed=0, world_size=3)
