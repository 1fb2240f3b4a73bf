"""FID while DMD trains: K one-step samples from fixed noise and balanced labels, scored every N steps.

What a healthy run looks like is a curve that falls from the teacher's one-step FID towards its ODE's
(DMD, arXiv 2311.18828, §5 reports the end point only). The score is FID in a small classifier's
features (classifier.py) where the data has labels and a test split: fashion-mnist, mnist and labelled
folders; elsewhere it is Inception FID (evaluate.py) when its weights and the reference statistics are
at hand, and the run says once why it is off when they are not. The teacher's own scores (1 Euler step
and Heun 18 steps, from the same noise) are computed once and cached in OUT/teacher_scores.json.
"""
import json
from pathlib import Path

import torch
from tqdm import tqdm

from .classifier import classifier_scores, format_scores, get_classifier, reference_statistics
from .data import CLASSIFIER_DATASETS, Subset, load_dataset
from .evaluate import EDM_REFS, InceptionV3, evaluate, load_ref
from .networks import denoiser_hash, sample_shape
from .plots import training_curves
from .report import write_log
from .sampler import sample_ode
from .utils import DMDError, atomic_write, cache_dir, per_index_noise

TEACHER_STEPS = 18                                 # the teacher's ODE line: Heun 18 steps (35 NFE)


class ClassifierScorer:
    """FID in a classifier's features, precision, recall and class accuracy of images [N, C, H, W] in [-1, 1]."""
    name = "classifier"

    def __init__(self, dataset, data_dir=None, download=False, device="cpu"):
        train_set = load_dataset(dataset, data_dir or None, download)
        if dataset in CLASSIFIER_DATASETS:
            test_set = load_dataset(dataset, data_dir or None, split="test")
            classifier_set = train_set
        else:   # a labelled folder: every 10th image is held out to measure the classifier's accuracy
            test_set = Subset(train_set, range(0, len(train_set), 10))
            classifier_set = Subset(train_set, [i for i in range(len(train_set)) if i % 10])
        self.classifier = get_classifier(classifier_set, test_set, cache_dir(), device)
        self.reference = reference_statistics(self.classifier, train_set)

    def __call__(self, images, labels):
        return dict(metric="FID in the classifier's features", **classifier_scores(self.classifier, images, labels,
                                                                                    self.reference))

    describe = staticmethod(format_scores)   # one line that says it is not Inception FID


class InceptionScorer:
    """Inception FID of images [N, C, H, W] in [-1, 1] against the training set's statistics (EDM's files)."""
    name = "inception"

    def __init__(self, dataset, device="cpu"):
        if dataset not in EDM_REFS:
            raise DMDError(f"{dataset} has no labels to train a classifier on and no Inception reference statistics")
        self.extractor = InceptionV3(device=device)
        self.mu, self.sigma = load_ref(EDM_REFS[dataset], self.extractor.name)

    def __call__(self, images, labels):
        uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        uint8 = uint8.expand(-1, 3, -1, -1) if uint8.shape[1] == 1 else uint8    # Inception takes RGB
        return dict(metric="Inception FID", **evaluate(uint8.permute(0, 2, 3, 1).cpu().numpy(), self.mu, self.sigma,
                                                       self.extractor))

    @staticmethod
    def describe(scores):
        return f"Inception FID {scores['fid']:.3f} ({scores['num_samples']} samples; the paper uses 50000)"


def make_scorer(cfg, label_dim):
    """The scorer for cfg's data, or None (with a one-line notice) when it cannot be had here."""
    try:
        if cfg.dataset in CLASSIFIER_DATASETS or (cfg.dataset == "folder" and label_dim > 0):
            return ClassifierScorer(cfg.dataset, cfg.data_dir, cfg.download, cfg.device)
        return InceptionScorer(cfg.dataset, cfg.device)
    except DMDError as e:
        print(f"notice: FID during training is off ({e})")
        return None


def cached_scores(path, key, compute):
    """compute()'s scores, kept in the JSON file at path with the key that says what they are of."""
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["scores"]
    scores = compute()
    atomic_write(path, lambda f: f.write(json.dumps(dict(key=key, scores=scores), indent=1).encode()))
    return scores


class Monitor:
    """Scores the one-step generator every cfg.eval_every steps and redraws OUT/curves.png."""

    def __init__(self, cfg, teacher, out):
        self.out, self.scorer = Path(out), make_scorer(cfg, teacher.label_dim)
        indices = range(cfg.eval_num)
        self.z = per_index_noise(indices, sample_shape(teacher), cfg.seed + 2, cfg.device)   # [K, C, H, W]
        self.labels = (torch.tensor(indices, device=cfg.device) % teacher.label_dim) if teacher.label_dim else None
        self.ode = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)   # the teacher's sampler
        self.teacher_scores = self.scorer and self.score_teacher(teacher)

    @torch.no_grad()
    def score(self, model):
        """The scores of model(z, labels) -> images [K, C, H, W] on the fixed noise, made in batches."""
        images = []
        for start in range(0, len(self.z), 250):
            labels = None if self.labels is None else self.labels[start:start + 250]
            images.append(model(self.z[start:start + 250], labels).float().cpu())
        return self.scorer(torch.cat(images), None if self.labels is None else self.labels.cpu())

    def score_teacher(self, teacher):
        """{'heun18': scores, 'euler1': scores} of the teacher from the same noise, cached in OUT under
        self.teacher_key (the teacher, the scorer, the noise count and the sampler)."""
        self.teacher_key = dict(teacher=denoiser_hash(teacher), scorer=self.scorer.name, num=len(self.z), **self.ode)
        return cached_scores(self.out / "teacher_scores.json", self.teacher_key, lambda: {
            f"heun{TEACHER_STEPS}": self.score(lambda z, y: sample_ode(teacher, z, TEACHER_STEPS, y, **self.ode)),
            "euler1": self.score(lambda z, y: sample_ode(teacher, z, 1, y, solver="euler", **self.ode))})

    def __call__(self, generator, state):
        """Score the generator, log it as a record {'step', 'eval'} and redraw curves.png; returns the record."""
        if self.scorer is None:
            return None
        record = dict(step=state["step"], eval=self.score(generator))
        state["history"].append(record)
        write_log(self.out, state["history"])
        tqdm.write(f"step {state['step']}: {self.scorer.describe(record['eval'])}")   # above the progress bar
        training_curves(state["history"], self.teacher_scores, self.out / "curves.png")
        return record
