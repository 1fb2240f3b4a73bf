"""FID and Inception Score of generated images, computed the way the DMD paper reports them (arXiv 2311.18828, §5).

    python -m dmd_minimal.evaluate --samples samples.npz --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python -m dmd_minimal.evaluate --samples pngs/ --dataset cifar10 --data-dir data --save-ref refs/cifar10.npz
    python -m dmd_minimal.evaluate --dataset cifar10 --data-dir data --save-ref refs/cifar10.npz   # the reference alone

FID (Heusel et al., arXiv 1706.08500) fits Gaussians N(mu, Sigma) to Inception-v3 features of the samples
and of the reference images and measures their Fréchet distance; the paper uses 50k samples against the
training set's statistics, which EDM publishes (fid-refs/*.npz holding mu and sigma). IS (Salimans et al.,
arXiv 1606.03498) is exp(E_x KL(p(y|x) || p(y))) under the same network's classifier.
The network is TensorFlow's inception-2015-12-05 graph, the one behind EDM's, ADM's and DMD's numbers, in
torch-fidelity's port: the original weights, TF 1.x's bilinear resize to 299x299 (which EDM's detector also
reproduces) and the 2048-d pool_3 features, so that its statistics and EDM's reference files agree.
"""
import argparse
import os
import sys
import warnings

import numpy as np
import PIL.Image
import scipy.linalg
import torch
from tqdm import tqdm

from .data import CLASSIFIER_DATASETS, load_dataset
from .image_files import CORRUPT, GRAY_MODES
from .load import cache_path, cached_download
from .utils import DMDError, atomic_write, reason

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")   # TF's weights, converted by torch-fidelity
EDM_REFS = {   # EDM's reference statistics of the training sets (EDM's README, "Calculating FID")
    "cifar10": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz",
    "imagenet64": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz",
}


# ---- the two scores -----------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(Sigma1 + Sigma2 - 2 (Sigma1 Sigma2)^(1/2)): the Fréchet distance of two Gaussians."""
    with warnings.catch_warnings(record=True) as singular:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if singular or not np.isfinite(covmean).all():   # a singular product (e.g. fewer samples than dimensions): nudge it
        offset = 1e-6 * np.eye(len(sigma1))
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real                # its imaginary part is rounding noise
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` consecutive parts of the samples: (mean, std)."""
    scores = []
    for p_yx in torch.softmax(logits.double(), dim=1).chunk(splits):    # [n, K]
        p_y = p_yx.mean(0, keepdim=True)                                  # [1, K]
        kl = torch.special.xlogy(p_yx, p_yx) - torch.special.xlogy(p_yx, p_y)   # 0 log 0 = 0
        scores.append(kl.sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ---- the feature extractor ----------------------------------------------------------------------

class InceptionV3:
    """pool_3 features [B, 2048] and classifier logits [B, 1008] of uint8 images [B, 3, H, W] (any H, W)."""
    name = "inception-2015-12-05"

    def __init__(self, weights=None, device="cpu"):
        path = weights or self.download()
        if not os.path.isfile(path):
            raise DMDError(f"Inception weights {path} do not exist: download {INCEPTION_URL}")
        try:   # a plain state_dict: refuse anything else before torch-fidelity unpickles it in full
            torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, *CORRUPT):
            raise DMDError(f"Inception weights {path} are corrupt or not a plain state_dict: "
                           f"download {INCEPTION_URL} again") from None
        try:   # here, so that nothing else pays for importing it
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise DMDError("FID needs torch-fidelity: pip install torch-fidelity") from None
        # 'logits_unbiased': the classifier without its bias, as the original IS code computes it
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=path)
        self.net, self.device = net.to(device), device

    @staticmethod
    def download():
        try:
            return cached_download(INCEPTION_URL)
        except DMDError:
            raise DMDError(f"FID needs the Inception-v3 weights {INCEPTION_URL} and cannot download them: "
                           f"put that file at {cache_path(INCEPTION_URL)} or pass --inception-weights FILE") from None

    def __call__(self, images):
        features, logits = self.net(images.to(self.device))
        return features, logits


@torch.no_grad()
def feature_statistics(batches, extractor, keep_logits=False):
    """mu [D] and Sigma [D, D] (float64 numpy) of the extractor's features over uint8 batches [B, 3, H, W].

    Sums of f and f f^T are accumulated (as EDM does), so a million reference images need no more memory
    than one batch; Sigma is the unbiased covariance. Returns (mu, sigma, n, logits [N, K] or None).
    """
    n, total, outer, logits = 0, 0, 0, []
    for images in batches:
        features, batch_logits = extractor(images)
        f = features.double()                                   # [B, D]
        n, total, outer = n + len(f), total + f.sum(0), outer + f.T @ f
        if keep_logits and batch_logits is not None:
            logits.append(batch_logits.cpu())
    if n < 2:
        raise DMDError(f"statistics need at least 2 images, got {n}")
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy(), n, (torch.cat(logits) if logits else None)


# ---- images in, statistics out ------------------------------------------------------------------

def load_images(path):
    """uint8 images [N, H, W, C] (C = 3, or 1 for grayscale) from an .npz (arr_0: the ADM evaluator's
    format) or a folder of PNGs."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if name.lower().endswith(".png"))
        if not names:
            raise DMDError(f"{path} holds no .png files")
        images = []
        for name in names:
            try:
                with PIL.Image.open(os.path.join(path, name)) as image:
                    gray = image.mode in GRAY_MODES
                    images.append(np.asarray(image.convert("L" if gray else "RGB")).reshape(*image.size[::-1], -1))
            except CORRUPT as e:
                raise DMDError(f"{os.path.join(path, name)} is not a readable PNG ({reason(e)})") from None
        if len({image.shape for image in images}) > 1:
            raise DMDError(f"the PNGs in {path} differ in size: {sorted({image.shape[:2] for image in images})}")
        return np.stack(images)
    try:
        with np.load(path, allow_pickle=False) as f:
            images = f["arr_0"]
    except KeyError:
        raise DMDError(f"{path} has no arr_0: samples go in arr_0 as uint8 [N, H, W, C]") from None
    except CORRUPT as e:
        raise DMDError(f"{path} is neither an .npz file nor a folder of PNGs ({reason(e)})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise DMDError(f"{path}: arr_0 is {images.dtype} {list(images.shape)}, not uint8 [N, H, W, C], C = 1 or 3")
    return images


def load_labels(path, num):
    """The class labels [num] stored beside arr_0 (sample.py writes them), or None."""
    if os.path.isdir(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        labels = f["labels"] if "labels" in f else None
    if labels is not None and labels.shape != (num,):
        raise DMDError(f"{path}: labels are {list(labels.shape)}, not [{num}] like arr_0")
    return labels


def array_batches(images, batch_size):
    """uint8 [N, H, W, C] -> uint8 tensors [B, 3, H, W] (a gray channel repeated: Inception takes RGB)."""
    for start in tqdm(range(0, len(images), batch_size), desc="samples", mininterval=1.0):
        yield torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)


def dataset_batches(dataset, batch_size):
    """A dataset's images, [-1, 1] floats as data.py gives them, back to uint8 [B, 3, H, W]."""
    loader = torch.utils.data.DataLoader(dataset, batch_size)
    for x, _ in tqdm(loader, desc="reference", mininterval=1.0):
        yield ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)


def save_ref(path, mu, sigma, extractor_name, num_images):
    """Reference statistics as EDM writes them (mu, sigma), plus what computed them."""
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, extractor=extractor_name, num_images=num_images))


def load_ref(path, extractor_name):
    """(mu, sigma) from a reference .npz (EDM's fid-refs or save_ref's), a file or a URL."""
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        path = cached_download(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
            made_by = str(f["extractor"]) if "extractor" in f else extractor_name   # EDM's files: Inception
    except CORRUPT as e:
        raise DMDError(f"reference {path} is not an .npz with mu and sigma ({reason(e)})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DMDError(f"reference {path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not fit together")
    if made_by != extractor_name:
        raise DMDError(f"reference {path} holds {made_by} statistics, not {extractor_name}: recompute it")
    return mu.astype(np.float64), sigma.astype(np.float64)


def evaluate(images, mu_ref, sigma_ref, extractor, batch_size=250):
    """FID of uint8 images [N, H, W, 3] against (mu_ref, sigma_ref), and IS where the extractor has a classifier."""
    mu, sigma, n, logits = feature_statistics(array_batches(images, batch_size), extractor, keep_logits=True)
    if mu.shape != mu_ref.shape:
        raise DMDError(f"the reference has {len(mu_ref)}-d features, the extractor {len(mu)}-d")
    result = dict(fid=frechet_distance(mu, sigma, mu_ref, sigma_ref), num_samples=n)
    if logits is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(logits)
    return result


def reference(args, extractor):
    """(mu, sigma) from --ref, or from --dataset (cached in --save-ref)."""
    if args.ref:
        return load_ref(args.ref, extractor.name)
    if args.save_ref and os.path.isfile(args.save_ref):
        print(f"using the reference statistics cached in {args.save_ref}")
        return load_ref(args.save_ref, extractor.name)
    dataset = load_dataset(args.dataset, args.data_dir, args.download)
    mu, sigma, n, _ = feature_statistics(dataset_batches(dataset, args.batch_size), extractor)
    if args.save_ref:
        save_ref(args.save_ref, mu, sigma, extractor.name, n)
        print(f"wrote the reference statistics of {n} {args.dataset} images to {args.save_ref}")
    return mu, sigma


def classifier_evaluation(args, images):
    """FID in a classifier's features, precision, recall and class accuracy (monitor.ClassifierScorer)."""
    from .classifier import format_scores   # here: both modules import this one
    from .monitor import ClassifierScorer
    scorer = ClassifierScorer(args.dataset, args.data_dir, args.download, args.device)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1      # [N, C, H, W] in [-1, 1]
    labels = load_labels(args.samples, len(images))
    result = scorer(x, None if labels is None else torch.from_numpy(labels).long())
    print(format_scores(result))
    return result


def main(argv=None, extractor=None):
    """The command line; `extractor` replaces Inception (the tests pass a small stand-in network)."""
    parser = argparse.ArgumentParser(prog="python -m dmd_minimal.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", help="samples: .npz with arr_0 uint8 [N, H, W, C] (and labels [N]), or a "
                                          "folder of PNGs (the paper uses 50000)")
    parser.add_argument("--ref", help="reference statistics .npz (mu, sigma), a file or URL, e.g. EDM's "
                                      + ", ".join(EDM_REFS.values()))
    parser.add_argument("--dataset", help="compute the reference from this dataset instead (see data.py); "
                                          f"{' and '.join(CLASSIFIER_DATASETS)} are scored in a classifier's features")
    parser.add_argument("--data-dir", help="where --dataset lives")
    parser.add_argument("--download", action="store_true", help="download --dataset if missing (cifar10, mnist, "
                                                                 "fashion-mnist)")
    parser.add_argument("--save-ref", help="cache the --dataset reference in this .npz (reused if present)")
    parser.add_argument("--batch-size", type=int, default=250, help="images per Inception call (default 250)")
    parser.add_argument("--inception-weights", help=f"local copy of {INCEPTION_URL} (default: torch.hub's cache)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        if bool(args.ref) == bool(args.dataset):
            raise DMDError("give the reference statistics as either --ref FILE or --dataset NAME [--data-dir DIR]")
        if not args.samples and not (args.dataset and args.save_ref):
            raise DMDError("nothing to do: give --samples to evaluate, or --dataset and --save-ref to make a reference")
        images = load_images(args.samples) if args.samples else None      # a bad file fails before the slow part
        if args.dataset in CLASSIFIER_DATASETS and images is not None and extractor is None:
            return classifier_evaluation(args, images)
        extractor = extractor or InceptionV3(args.inception_weights, args.device)
        mu_ref, sigma_ref = reference(args, extractor)
        if images is not None:
            result = evaluate(images, mu_ref, sigma_ref, extractor, args.batch_size)
            score = f"  IS {result['inception_score']:.2f} ± {result['inception_score_std']:.2f}" \
                if "inception_score" in result else ""
            note = "" if result["num_samples"] == 50000 else "; the paper uses 50000"
            print(f"FID {result['fid']:.3f}{score}  ({result['num_samples']} samples{note})")
            return result
    except DMDError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
