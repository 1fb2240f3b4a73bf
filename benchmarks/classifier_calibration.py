"""Calibration of the classifier metric (classifier.py) on Fashion-MNIST: what real images score.

    python benchmarks/classifier_calibration.py                      # Debian's /usr/share/datasets/fashion-mnist
    python benchmarks/classifier_calibration.py --data-dir DIR       # the four IDX files (data.load_dataset)

The test split is scored against the train split's statistics at 1k, 5k and 10k samples (disjoint
subsets, mean ± std over them): a small-sample FID is biased upwards. For scale, the same with a
defect (half the classes dropped; Gaussian noise added), and pure noise. Prints a markdown table.
FID here is FID in the classifier's features: not Inception FID, not comparable with papers' numbers.
"""
import argparse
import statistics
import time

import torch

from dmd_minimal.classifier import NOT_INCEPTION, classifier_scores, get_classifier, reference_statistics
from dmd_minimal.data import load_dataset
from dmd_minimal.utils import cache_dir

COLUMNS = ("fid", "precision", "recall", "class_accuracy")


def as_images(split, indices):
    """float [N, 1, 28, 28] in [-1, 1] and labels [N] of the given items."""
    return split.images[indices].float() / 127.5 - 1, split.labels[indices]


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="Fashion-MNIST's four IDX files (default: Debian's folder)")
    parser.add_argument("--cache-dir", default=cache_dir(), help="where the classifier is cached (default: %(default)s)")
    args = parser.parse_args()
    train_set, test_set = (load_dataset("fashion-mnist", args.data_dir, split=split) for split in ("train", "test"))
    start = time.time()
    classifier = get_classifier(train_set, test_set, args.cache_dir)
    print(f"classifier ready in {time.time() - start:.0f} s (training included if it was not cached)")
    reference = reference_statistics(classifier, train_set)

    order = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))   # [10000]
    rows = {}   # name: [(images, labels)], one pair per disjoint subset
    for n in (1000, 5000, 10000):
        parts = order.split(n)
        name = f"test split, {n}" + (f" ({len(parts)} subsets)" if len(parts) > 1 else "")
        rows[name] = [as_images(test_set, part) for part in parts]
    half = torch.nonzero(test_set.labels < 5).squeeze(1)                                   # classes 0-4
    rows[f"test split, classes 0-4 only, {len(half)}"] = [as_images(test_set, half)]
    noise = torch.Generator().manual_seed(0)
    x, y = as_images(test_set, order)
    rows[f"test split + Gaussian noise (std 0.1), {len(x)}"] = [(x + 0.1 * torch.randn(x.shape, generator=noise), y)]
    for n in (1000, 10000):
        rows[f"uniform noise, {n}"] = [(torch.rand(n, *x.shape[1:], generator=noise) * 2 - 1, None)]
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
