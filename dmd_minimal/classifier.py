"""A quality metric that needs no download: the features of a small classifier trained on the data set itself.

Inception FID (evaluate.py) needs Inception-v3's weights and was made for ImageNet photographs. For
Fashion-MNIST, MNIST or any labelled image folder, a small CNN is trained once on the train split
(cached under a hash of the data and of its settings) and its penultimate features f(x) [N, 128] give:
- FID in the classifier's features: the Fréchet distance of Gaussians fitted to the features of the
  samples and of the train split (Heusel et al., arXiv 1706.08500), by evaluate.frechet_distance. It is
  not Inception FID: its numbers do not compare with papers'.
- precision and recall (Kynkäänniemi et al., arXiv 1904.06991, §2, k = 3): each set of features is a
  manifold estimate, the union of balls around its points of radius the distance to the k-th nearest
  neighbour; precision is the share of samples inside the real manifold, recall the share of real
  images inside the samples' manifold.
- class accuracy: how often the classifier's argmax names the class a class-conditional sample was drawn
  for (does a "sandal" sample look like a sandal).
"""
import hashlib
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .evaluate import feature_statistics, frechet_distance
from .utils import DMDError, atomic_save, hide_progress, load_file

NOT_INCEPTION = "FID in the classifier's features (not Inception FID; not comparable with papers' numbers)"
TRAINING = dict(   # what the cache's hash covers besides the data and the architecture
    epochs=4,           # Fashion-MNIST: test accuracy 0.901 after about 100 s on one core of a shared 2-core VM
    batch_size=128,
    lr=3e-3,            # Adam, the peak of a one-cycle schedule
    seed=0,             # the initialisation and the order of the batches
)


class Classifier(nn.Module):
    """A small CNN for images [B, C, H, W] in [-1, 1], any H = W from 14 to 64: logits [B, K], features [B, D]."""

    def __init__(self, channels, resolution, num_classes, width=16, feature_dim=128):
        super().__init__()
        self.channels, self.resolution = channels, resolution   # of the images it was trained on
        self.test_accuracy = None                                # set by get_classifier

        def block(c_in, c_out, stride):   # stride-2 convolutions downsample: cheaper on a CPU than max-pooling
            return [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.body = nn.Sequential(
            *block(channels, width, 2),          # [B, w, H/2, W/2]
            *block(width, 2 * width, 2),         # [B, 2w, H/4, W/4]
            *block(2 * width, 4 * width, 1),     # [B, 4w, H/4, W/4]
            nn.AdaptiveAvgPool2d(2),             # [B, 4w, 2, 2]: any resolution, coarse positions kept
            nn.Flatten(),                        # [B, 16w]
            nn.Linear(16 * width, feature_dim),  # [B, D]: the features the scores use
        )
        # the ReLU after the features, not in them: some of its outputs are always 0, which makes Sigma singular
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))   # [B, K]

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def to_float(images):
    """uint8 [B, C, H, W] -> float32 in [-1, 1], as data.py gives images."""
    return images.float() / 127.5 - 1


def uint8_arrays(dataset, batch_size=1000):
    """A dataset's images back to uint8 [N, C, H, W] (0..255, as stored) and its labels int64 [N]."""
    images, labels = [], []
    # its own generator: a DataLoader draws a seed for its iterator even without workers or shuffling
    for x, y in torch.utils.data.DataLoader(dataset, batch_size, generator=torch.Generator()):
        images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def embed(classifier, batches):
    """Features [N, D] and logits [N, K], on the CPU, of float image batches [B, C, H, W] in [-1, 1]."""
    device = next(classifier.parameters()).device
    features, logits = [], []
    for x in batches:
        f = classifier.features(x.to(device))   # [B, D]
        features.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(features), torch.cat(logits)


def accuracy(logits, labels):
    """The share of argmax predictions [N, K] -> [N] that equal labels [N]."""
    return (logits.argmax(1) == labels).float().mean().item()


# ---- the classifier, trained once per data set ---------------------------------------------------

def train_classifier(images, labels, resolution, num_classes, device):
    """Cross-entropy training with Adam on uint8 images [N, C, H, W], as TRAINING says; deterministic."""
    epochs, batch_size, lr, seed = (TRAINING[key] for key in ("epochs", "batch_size", "lr", "seed"))
    steps_per_epoch = len(images) // batch_size   # full batches only, as BatchNorm prefers
    if steps_per_epoch == 0:
        raise DMDError(f"the train split has {len(images)} images, too few for a batch of {batch_size}")
    with torch.random.fork_rng(devices=[]):       # the initialisation leaves the caller's RNG as it was
        torch.manual_seed(seed)
        classifier = Classifier(images.shape[1], resolution, num_classes).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    classifier.train()
    with tqdm(total=epochs * steps_per_epoch, desc="classifier", mininterval=1.0, disable=hide_progress()) as bar:
        for _ in range(epochs):
            batches = torch.randperm(len(images), generator=order)[: steps_per_epoch * batch_size]
            for batch in batches.view(steps_per_epoch, batch_size):   # [B] indices
                x, y = to_float(images[batch]).to(device), labels[batch].to(device)
                loss = F.cross_entropy(classifier(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return classifier.eval()


def data_hash(images, labels, num_classes):
    """sha256 of the uint8 train images, their labels, the architecture and TRAINING: a change to any retrains."""
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    with torch.device("meta"):   # no weights, so no draw from the caller's RNG
        architecture = repr(Classifier(images.shape[1], images.shape[2], num_classes))   # every layer's settings
    h.update(repr((list(images.shape), architecture, sorted(TRAINING.items()))).encode())
    return h.hexdigest()


def load_classifier(path, channels, resolution, num_classes, device):
    """The cached classifier at path, or None (with a notice) if the file is corrupt."""
    try:
        state = load_file(path, "classifier", required=("state_dict",))
        classifier = Classifier(channels, resolution, num_classes)
        classifier.load_state_dict(state["state_dict"])
    except (DMDError, RuntimeError) as e:   # RuntimeError: a state_dict that does not fit
        print(f"retraining the classifier: {e}")
        return None
    return classifier.to(device).eval()


def get_classifier(train_set, test_set, cache_dir, device="cpu"):
    """The classifier of train_set from cache_dir; trained there first if missing, changed or corrupt.

    Datasets yield (image float32 [C, H, W] in [-1, 1], label) and have .channels, .resolution and
    .num_classes (data.py). Prints the accuracy on test_set, kept as `classifier.test_accuracy`.
    """
    if train_set.num_classes < 2:
        raise DMDError("the classifier metric needs a labelled dataset (at least 2 classes)")
    if not 14 <= train_set.resolution <= 64:
        raise DMDError(f"the classifier metric takes 14x14 to 64x64 images, "
                       f"not {train_set.resolution}x{train_set.resolution}")
    if (test_set.channels, test_set.resolution) != (train_set.channels, train_set.resolution):
        raise DMDError(f"the test split's images ({test_set.channels} channels, {test_set.resolution}x"
                       f"{test_set.resolution}) differ from the train split's")
    C, R, K = train_set.channels, train_set.resolution, train_set.num_classes
    images, labels = uint8_arrays(train_set)   # [N, C, H, W], [N]
    path = os.path.join(cache_dir, f"classifier-{data_hash(images, labels, K)[:16]}.pt")
    classifier = load_classifier(path, C, R, K, device) if os.path.isfile(path) else None
    if classifier is None:
        start = time.time()
        classifier = train_classifier(images, labels, R, K, device)
        atomic_save({"state_dict": classifier.state_dict(), "training": TRAINING}, path)
        print(f"trained the classifier on {len(images)} images in {time.time() - start:.0f} s; cached in {path}")
    test_images, test_labels = uint8_arrays(test_set)
    _, logits = embed(classifier, map(to_float, test_images.split(1000)))
    classifier.test_accuracy = accuracy(logits, test_labels)
    print(f"classifier accuracy on the {len(test_images)} test images: {classifier.test_accuracy:.4f}")
    return classifier


# ---- the scores ----------------------------------------------------------------------------------

def reference_statistics(classifier, dataset, batch_size=1000):
    """mu [D] and Sigma [D, D] (float64 numpy) of the features of a dataset (the train split), and the
    features themselves [N, D] for precision and recall."""
    images, _ = uint8_arrays(dataset, batch_size)
    features, _ = embed(classifier, map(to_float, images.split(batch_size)))
    mu, sigma, n, _ = feature_statistics(features.split(batch_size), lambda f: (f, None))
    return dict(mu=mu, sigma=sigma, features=features, num_images=n)


def knn_radii(features, k, chunk):
    """The distance of each row of features [N, D] to its k-th nearest neighbour among the others: [N]."""
    # k + 1: every point is its own nearest neighbour, at distance 0
    return torch.cat([torch.cdist(f, features).kthvalue(k + 1, dim=1).values for f in features.split(chunk)])


def inside(queries, points, radii, chunk):
    """Whether each query [M, D] lies within radii[j] of some points[j] ([N, D], [N]): bool [M]."""
    return torch.cat([(torch.cdist(q, points) <= radii).any(1) for q in queries.split(chunk)])


def precision_recall(real, fake, k=3, chunk=1000):
    """Improved precision and recall of features fake [M, D] against real [N, D] (arXiv 1904.06991, §2)."""
    if min(len(real), len(fake)) <= k:
        raise DMDError(f"precision and recall with k = {k} need more than {k} samples, got {min(len(real), len(fake))}")
    precision = inside(fake, real, knn_radii(real, k, chunk), chunk).float().mean().item()
    recall = inside(real, fake, knn_radii(fake, k, chunk), chunk).float().mean().item()
    return precision, recall


def classifier_scores(classifier, images, labels, reference, k=3, seed=0, batch_size=1000):
    """FID in the classifier's features (not Inception FID), precision, recall and class accuracy of
    float images [N, C, H, W] in [-1, 1], drawn for classes labels [N] (or None), against
    reference_statistics. Precision and recall use N real features, a subset fixed by seed."""
    expected = [classifier.channels, classifier.resolution, classifier.resolution]
    if images.ndim != 4 or list(images.shape[1:]) != expected:
        raise DMDError(f"samples are {list(images.shape)}, not [N, {', '.join(map(str, expected))}] "
                       f"as the classifier's training images")
    if len(images) <= k:
        raise DMDError(f"the scores need more than {k} samples, got {len(images)}")
    K = classifier.head[-1].out_features
    if labels is not None and (labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= K):
        raise DMDError(f"labels must be {len(images)} class indices 0..{K - 1}")
    # clamped as a saved PNG would be
    features, logits = embed(classifier, images.clamp(-1, 1).split(batch_size))   # [N, D], [N, K]
    mu, sigma, n, _ = feature_statistics(features.split(batch_size), lambda f: (f, None))
    real = reference["features"]
    real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]]
    precision, recall = precision_recall(real, features, k)
    return dict(fid=frechet_distance(mu, sigma, reference["mu"], reference["sigma"]), precision=precision,
                recall=recall, class_accuracy=None if labels is None else accuracy(logits, labels.cpu()), num_samples=n)


def format_scores(scores):
    """One line: FID in the classifier's features (saying it is not Inception FID), precision, recall."""
    line = f"{NOT_INCEPTION}: {scores['fid']:.3f}, precision {scores['precision']:.3f}, recall {scores['recall']:.3f}"
    if scores["class_accuracy"] is not None:
        line += f", class accuracy {scores['class_accuracy']:.3f}"
    return line + f" ({scores['num_samples']} samples)"
