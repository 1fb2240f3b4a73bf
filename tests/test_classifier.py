"""The classifier metric: precision and recall against their definition and cases with known answers, the
classifier's cache, class accuracy, and the scores of Fashion-MNIST's test split and of noise where the
dataset is installed. (The Fréchet distance itself is tested in test_evaluate.py.)"""
import os

import numpy as np
import pytest
import torch

from dmd_minimal import classifier as metric
from dmd_minimal.classifier import (NOT_INCEPTION, classifier_scores, format_scores, get_classifier, precision_recall,
                                    reference_statistics)
from dmd_minimal.data import Shapes, load_dataset
from dmd_minimal.evaluate import main as evaluate_main
from dmd_minimal.mnist import TensorImages
from dmd_minimal.utils import DMDError

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"   # Debian's dataset-fashion-mnist


def brute_force_precision_recall(real, fake, k):
    """The definition, with full distance matrices: f(x, S) = 1 if |x - s| <= r_k(s) for some s in S."""
    real, fake = real.double().numpy(), fake.double().numpy()

    def covered(queries, points):
        d_points = np.linalg.norm(points[:, None] - points[None], axis=-1)   # [N, N]
        radii = np.sort(d_points, axis=1)[:, k]                               # index 0 is the point itself
        d = np.linalg.norm(queries[:, None] - points[None], axis=-1)          # [M, N]
        return (d <= radii).any(1).mean()
    return covered(fake, real), covered(real, fake)


def test_precision_recall_of_identical_and_disjoint_sets():
    real = torch.randn(300, 8)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, torch.randn(200, 8) + 100) == (0.0, 0.0)


def test_precision_recall_of_a_partial_overlap():
    # real: clusters A and B; samples: A again (B dropped) and a cluster C far from the data
    A, B, C = torch.randn(20, 4), torch.randn(20, 4) + 50, torch.randn(10, 4) - 50
    precision, recall = precision_recall(torch.cat([A, B]), torch.cat([A, C]))
    assert precision == pytest.approx(20 / 30)   # the A samples are real, the C samples not
    assert recall == pytest.approx(20 / 40)      # A is covered, B not


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_the_definition(k):
    real, fake = torch.randn(150, 5), 0.8 * torch.randn(110, 5) + 0.7   # overlapping, neither 0 nor 1
    expected = brute_force_precision_recall(real, fake, k)
    got = precision_recall(real, fake, k, chunk=16)                   # several chunks, a ragged last one
    assert 0.1 < expected[0] < 0.95 and 0.1 < expected[1] < 0.95
    assert got == pytest.approx(expected, abs=1e-6)   # float32 means of exact counts


@pytest.fixture
def tiny_training(monkeypatch):
    """TRAINING for seconds of work, and a count of the trainings."""
    monkeypatch.setitem(metric.TRAINING, "epochs", 2)
    monkeypatch.setitem(metric.TRAINING, "batch_size", 16)
    calls = []
    train = metric.train_classifier
    monkeypatch.setattr(metric, "train_classifier", lambda *args: calls.append(1) or train(*args))
    return calls


def test_the_classifier_is_cached_by_a_hash_of_the_data(tmp_path, tiny_training, capsys):
    train_set, test_set = Shapes(16, size=96, seed=0), Shapes(16, size=32, seed=1)
    first = get_classifier(train_set, test_set, tmp_path)
    assert len(tiny_training) == 1 and len(list(tmp_path.glob("classifier-*.pt"))) == 1
    assert "test images" in capsys.readouterr().out
    again = get_classifier(train_set, test_set, tmp_path)                 # loaded, not trained
    assert len(tiny_training) == 1
    x = test_set[0][0][None]
    assert torch.equal(first(x), again(x)) and again.test_accuracy == first.test_accuracy

    images, labels = metric.uint8_arrays(train_set)
    changed = labels.clone()
    changed[0] = (changed[0] + 1) % train_set.num_classes               # one label
    get_classifier(TensorImages(images, changed, train_set.num_classes), test_set, tmp_path)
    assert len(tiny_training) == 2
    images = images.clone()
    images[0, 0, 0, 0] ^= 1                                              # one pixel
    get_classifier(TensorImages(images, labels, train_set.num_classes), test_set, tmp_path)
    assert len(tiny_training) == 3
    metric.TRAINING["epochs"] = 3                                        # the settings (monkeypatch restores them)
    get_classifier(train_set, test_set, tmp_path)
    assert len(tiny_training) == 4 and len(list(tmp_path.glob("classifier-*.pt"))) == 4


def test_training_is_deterministic_and_a_corrupt_cache_is_retrained(tmp_path, tiny_training, capsys):
    train_set, test_set = Shapes(16, size=64, seed=0), Shapes(16, size=16, seed=1)
    state = torch.get_rng_state()
    first = get_classifier(train_set, test_set, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), state)                     # the caller's RNG is untouched
    (path,) = (tmp_path / "a").glob("classifier-*.pt")
    path.write_bytes(path.read_bytes()[:1000])                           # truncated
    capsys.readouterr()
    again = get_classifier(train_set, test_set, tmp_path / "a")
    assert len(tiny_training) == 2 and "retraining the classifier" in capsys.readouterr().out
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_class_accuracy_and_the_printed_line(tmp_path, tiny_training):
    train_set, test_set = Shapes(16, size=64, seed=0), Shapes(16, size=40, seed=1)
    classifier = get_classifier(train_set, test_set, tmp_path)
    reference = reference_statistics(classifier, train_set)
    assert reference["num_images"] == 64 and reference["features"].shape == (64, 128)
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])   # [40, 3, 16, 16]
    with torch.no_grad():
        predicted = classifier(images).argmax(1)
    right = classifier_scores(classifier, images, predicted, reference)
    wrong = classifier_scores(classifier, images, (predicted + 1) % 4, reference)
    unlabelled = classifier_scores(classifier, images, None, reference)
    assert right["class_accuracy"] == 1 and wrong["class_accuracy"] == 0 and unlabelled["class_accuracy"] is None
    assert right["num_samples"] == 40 and right["fid"] == unlabelled["fid"] > 0
    assert 0 <= right["precision"] <= 1 and 0 <= right["recall"] <= 1
    line = format_scores(right)
    assert NOT_INCEPTION in line and "class accuracy 1.000" in line and "\n" not in line
    assert "class accuracy" not in format_scores(unlabelled)


def test_bad_input_is_a_one_line_error(tmp_path, tiny_training):
    train_set = Shapes(16, size=64)
    unlabelled = TensorImages(torch.zeros(32, 1, 16, 16, dtype=torch.uint8), torch.zeros(32, dtype=torch.int64), 0)
    with pytest.raises(DMDError, match="labelled"):
        get_classifier(unlabelled, unlabelled, tmp_path)
    classifier = get_classifier(train_set, train_set, tmp_path)
    reference = reference_statistics(classifier, train_set)
    with pytest.raises(DMDError, match=r"not \[N, 3, 16, 16\]"):
        classifier_scores(classifier, torch.zeros(10, 1, 16, 16), None, reference)
    with pytest.raises(DMDError, match="class indices 0..3"):
        classifier_scores(classifier, torch.zeros(10, 3, 16, 16), torch.full((10,), 4), reference)


# ---- the real data ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_mnist(tmp_path_factory):
    """(classifier, reference statistics of the train split, the test split), trained once for this module."""
    if not os.path.isdir(FASHION_MNIST):
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("DMD_CACHE", str(cache))   # the decompressed IDX files go here, not into ~
        train_set, test_set = (load_dataset("fashion-mnist", split=split) for split in ("train", "test"))
    classifier = get_classifier(train_set, test_set, cache)
    return classifier, reference_statistics(classifier, train_set), test_set, cache


def test_the_fashion_mnist_classifier_is_accurate(fashion_mnist):
    classifier, _, _, _ = fashion_mnist
    assert classifier.test_accuracy >= 0.88


def test_fashion_mnist_test_split_scores_well_and_noise_badly(fashion_mnist):
    classifier, reference, test_set, _ = fashion_mnist
    images, labels = test_set.images.float() / 127.5 - 1, test_set.labels   # [10000, 1, 28, 28]
    real = classifier_scores(classifier, images, labels, reference)
    noise = classifier_scores(classifier, torch.rand(2000, 1, 28, 28) * 2 - 1, None, reference)
    print(format_scores(real), format_scores(noise), sep="\n")
    # benchmarks/classifier_calibration.py: FID 0.034, precision 0.88, recall 0.90; noise: FID 202, 0, 0
    assert real["fid"] < 0.2 and real["precision"] > 0.8 and real["recall"] > 0.8
    assert real["class_accuracy"] == pytest.approx(classifier.test_accuracy)
    assert noise["fid"] > 50 and noise["precision"] < 0.1 and noise["recall"] < 0.05


def test_evaluate_prints_every_score_for_fashion_mnist_samples(fashion_mnist, tmp_path, monkeypatch, capsys):
    """python -m dmd_minimal.evaluate --samples X.npz --dataset fashion-mnist, on test images written the way
    sample.py writes them (arr_0 uint8 [N, 28, 28, 1], labels [N]); the classifier comes from the cache."""
    classifier, reference, test_set, cache = fashion_mnist
    monkeypatch.setenv("DMD_CACHE", str(cache))
    np.savez(tmp_path / "x.npz", arr_0=test_set.images[:2000].permute(0, 2, 3, 1).numpy(),
             labels=test_set.labels[:2000].numpy())
    result = evaluate_main(["--samples", str(tmp_path / "x.npz"), "--dataset", "fashion-mnist"])
    out = capsys.readouterr().out
    assert "trained the classifier" not in out and f"{NOT_INCEPTION}: " in out
    expected = classifier_scores(classifier, test_set.images[:2000].float() / 127.5 - 1, test_set.labels[:2000],
                                 reference)
    assert result == {**expected, "metric": "FID in the classifier's features"}
    assert result["fid"] < 1 and result["class_accuracy"] > 0.85
