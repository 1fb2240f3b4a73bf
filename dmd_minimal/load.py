"""load_denoiser: one entry point for every file that holds a denoiser, ours or EDM's.

- dmd_minimal's files (torch.save zip archives, read with weights_only=True): a teacher file or a file
  written by convert_edm ({"denoiser": ...}), or a training checkpoint ({"generator", "fake_score"}, whose
  teacher is the file its provenance names, checked by its hash; older checkpoints also hold "teacher").
- EDM's network snapshots (.pkl), among them the teachers DMD distils (arXiv 2311.18828, §5 and
  Appendix B), read by edm_pickle without EDM's code and without executing the pickle.
- an http(s) URL of either, downloaded once into torch.hub's cache (keyed by the whole URL).
"""
import hashlib
import os
import re
import urllib.parse
import zipfile

import torch

from .edm_pickle import denoiser_from_edm_snapshot
from .networks import denoiser_from_dict, denoiser_hash
from .utils import DMDError, file_lock, hide_progress, load_file, reason

EDM_TEACHERS = {   # NVIDIA's released EDM networks that DMD distils (EDM's README, "Pre-trained models")
    "cifar10-cond": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl",
    "cifar10-uncond": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
    "imagenet64-cond": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl",
}
CHECKPOINT_NETS = ("teacher", "generator", "fake_score")
TRAINED_NETS = ("generator", "fake_score")   # what a checkpoint must hold
PUBLISHED_HASH = re.compile(r"-([0-9a-f]{8,64})\.")   # a SHA-256 prefix in a file name, as torch.hub's HASH_REGEX


def cache_path(url):
    """Where cached_download keeps `url`: torch.hub's checkpoint cache, under the URL's file name and a
    hash of the whole URL (edm-tiny.url-<12 hex>.pkl), so two URLs ending in the same name never share a copy."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise DMDError(f"cannot tell a file name from the URL {url}")
    stem, ext = os.path.splitext(name)
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:12]
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{stem}.url-{url_hash}{ext}")


def cached_download(url):
    """The local copy of `url` (at cache_path(url)), downloaded (atomically) if missing.

    Where the URL's file name carries the first hex digits of the file's SHA-256 (torch.hub's convention,
    as in vgg16-397923af.pth), the download is checked against them.
    """
    path = cache_path(url)
    with file_lock(path + ".lock"):   # one process downloads, the others (torchrun's) wait here, not in a collective
        if not os.path.isfile(path):
            published = PUBLISHED_HASH.search(os.path.basename(urllib.parse.urlparse(url).path))
            hash_prefix = published.group(1) if published else None   # None: the publisher gives no hash
            try:
                torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix, progress=not hide_progress())
            except (OSError, ValueError, RuntimeError) as e:   # urllib's: OSErrors; a wrong hash: a RuntimeError
                raise DMDError(f"cannot download {url} ({reason(e)}): without internet, download it elsewhere "
                               f"and put it in {os.path.dirname(path)}/ as {os.path.basename(path)}") from None
    return path


def stored_denoiser(saved, which, path):
    """The denoiser dict that `which` names in a file of ours (None: a checkpoint's teacher, stored apart)."""
    if which not in CHECKPOINT_NETS:
        raise DMDError(f"which must be one of {', '.join(CHECKPOINT_NETS)}, not {which!r}")
    if isinstance(saved, dict) and "denoiser" in saved:
        if which != "teacher":
            raise DMDError(f"{path} holds a single (teacher) denoiser; which={which!r} needs a training checkpoint")
        return saved["denoiser"]
    if isinstance(saved, dict) and all(name in saved for name in TRAINED_NETS):
        return saved.get(which)
    raise DMDError(f"{path} is neither a denoiser file nor a training checkpoint of dmd_minimal")


def checkpoint_teacher(saved, path):
    """The teacher a checkpoint was distilled from: the file its provenance names (or teacher.pt beside the
    checkpoint, for a run folder that moved), refused unless its hash is the one the run distilled."""
    provenance = saved.get("provenance", {})
    named = provenance.get("teacher_path", "")
    candidates = [named] if named.startswith(("http://", "https://")) else \
        [p for p in (named, os.path.join(os.path.dirname(os.fspath(path)), "teacher.pt")) if p and os.path.isfile(p)]
    if not candidates:
        raise DMDError(f"{path} was distilled from the teacher {named or '(unnamed)'}, which is not there: "
                       f"pass that teacher (--checkpoint TEACHER) to sample it")
    teacher = load_denoiser(candidates[0])
    if denoiser_hash(teacher) != provenance.get("teacher"):
        raise DMDError(f"{candidates[0]} is not the teacher {path} was distilled from (hash {denoiser_hash(teacher)}, "
                       f"not {provenance.get('teacher')}): pass that teacher's file instead")
    return teacher


def load_denoiser(path, which="teacher", dropout=0.0):
    """The Denoiser stored in `path` (a file or URL: ours, or an EDM snapshot .pkl), in eval mode.

    Args:
        which: for a training checkpoint, the network to return: teacher, generator or fake_score.
        dropout: replaces the stored dropout rate of an image network (DMD distils with dropout off);
            None keeps the stored rate.
    """
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        path = cached_download(path)
    if not os.path.isfile(path):
        raise DMDError(f"denoiser file {path} does not exist")
    try:
        is_zip = zipfile.is_zipfile(path)   # torch.save writes zip archives, EDM's snapshots are plain pickles
    except zipfile.BadZipFile as e:         # a damaged end record raises instead of answering False
        raise DMDError(f"denoiser file {path} is corrupt ({reason(e)})") from None
    if not is_zip:
        if which != "teacher":
            raise DMDError(f"{path} is not a training checkpoint of dmd_minimal; which={which!r} needs one")
        return denoiser_from_edm_snapshot(path, dropout)
    saved = load_file(path, "denoiser file")
    stored = stored_denoiser(saved, which, path)
    if stored is None:
        return checkpoint_teacher(saved, path)
    try:
        arch_kwargs = dict(stored["arch_kwargs"])
        if dropout is not None and "dropout" in arch_kwargs:
            arch_kwargs["dropout"] = dropout
        return denoiser_from_dict(dict(stored, arch_kwargs=arch_kwargs)).eval()
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DMDError(f"{path} holds a denoiser that cannot be rebuilt ({reason(e)})") from None
