"""Calibration of the classifier metric (classifier.py) on Fashion-MNIST: what real images score.

    python benchmarks/classifier_calibration.py                      # Debian's /usr/share/datasets/fashion-mnist
    python benchmarks/classifier_calibration.py --data-dir DIR       # a folder with the four IDX .gz files

The test split is scored against the train split's statistics at 1k, 5k and 10k samples (disjoint
subsets, mean ± std over them): a small-sample FID is biased upwards. For scale, the same with a
defect (half the classes dropped; Gaussian noise added), and pure noise. Prints a markdown table.
FID here is FID in the classifier's features: not Inception FID, not comparable with papers' numbers.
"""
import argparse
import gzip
import os
import shutil
import statistics
import tempfile
import time

import torch

from dmd_minimal.classifier import NOT_INCEPTION, classifier_scores, get_classifier, reference_statistics

COLUMNS = ("fid", "precision", "recall", "class_accuracy")


class FashionMNISTSplit(torch.utils.data.Dataset):
    """A split as torchvision.datasets.FashionMNIST reads it, with items as data.py gives them
    (until data.load_dataset('fashion-mnist') does this)."""
    channels, resolution, num_classes = 1, 28, 10

    def __init__(self, root, train):
        from torchvision.datasets import FashionMNIST
        split = FashionMNIST(root, train=train)
        self.images, self.labels = split.data, split.targets   # uint8 [N, 28, 28], int64 [N]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][None].float() / 127.5 - 1, self.labels[i]


def read_fashion_mnist(gz_dir, root):
    """(train, test) from the four IDX .gz files, decompressed into root/FashionMNIST/raw for torchvision."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in os.listdir(gz_dir):
        if name.endswith("-ubyte.gz"):
            with gzip.open(os.path.join(gz_dir, name)) as f, open(os.path.join(raw, name[:-3]), "wb") as out:
                shutil.copyfileobj(f, out)
    return FashionMNISTSplit(root, train=True), FashionMNISTSplit(root, train=False)


def as_images(split, indices):
    """float [N, 1, 28, 28] in [-1, 1] and labels [N] of the given items."""
    return split.images[indices][:, None].float() / 127.5 - 1, split.labels[indices]


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist", help="the four IDX .gz files")
    parser.add_argument("--cache-dir", default="runs/classifier", help="where the classifier is cached")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        train_set, test_set = read_fashion_mnist(args.data_dir, root)
        start = time.time()
        classifier = get_classifier(train_set, test_set, args.cache_dir)
        print(f"classifier ready in {time.time() - start:.0f} s (training included if it was not cached)")
        reference = reference_statistics(classifier, train_set)

    order = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))   # [10000]
    noise = torch.Generator().manual_seed(0)
    first_half = torch.nonzero(test_set.labels < 5).squeeze(1)                            # classes 0-4
    x, y = as_images(test_set, order)
    rows = {   # name: list of (images, labels), one per disjoint subset
        **{f"test split, {n} ({len(order) // n} subsets)" if n < len(order) else f"test split, {n}":
           [as_images(test_set, part) for part in order.split(n)] for n in (1000, 5000, 10000)},
        "test split, classes 0-4 only, 5000": [as_images(test_set, first_half)],
        "test split + Gaussian noise (std 0.1), 10000": [((x + 0.1 * torch.randn(x.shape, generator=noise)), y)],
        "uniform noise, 1000": [(torch.rand(1000, 1, 28, 28, generator=noise) * 2 - 1, None)],
        "uniform noise, 10000": [(torch.rand(10000, 1, 28, 28, generator=noise) * 2 - 1, None)],
    }
    print(f"\nFID: {NOT_INCEPTION}. Reference: the {reference['num_images']} train images; "
          f"classifier test accuracy {classifier.test_accuracy:.4f}.\n")
    print("| samples | FID (classifier features) | precision | recall | class accuracy |")
    print("|---|---|---|---|---|")
    for name, parts in rows.items():
        scores = [classifier_scores(classifier, images, labels, reference) for images, labels in parts]
        cells = [mean_std([s[c] for s in scores]) if scores[0][c] is not None else "-" for c in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
