"""Small shared helpers: user-facing errors, progress bars, atomic files, per-index noise, RNG state."""
import hashlib
import os
import tempfile

import torch


class DMDError(Exception):
    """A problem with the user's input: the command line prints it as one line, without a traceback."""


def reason(e):
    """The first line of an exception's message, for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def hide_progress(rank=0):
    """Whether to hide a tqdm bar: on every process but 0, and everywhere with TQDM_DISABLE=1 in the
    environment (tqdm itself reads that variable only where a call leaves `disable` unset)."""
    return rank > 0 or os.environ.get("TQDM_DISABLE", "") not in ("", "0")


def atomic_write(path, write):
    """Call write(f) on a temporary file in the same folder, then rename: never a half-written file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_file(path, kind, required=()):
    """torch.load a dict we wrote (weights_only), with one-line errors for missing or corrupt files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DMDError(f"{kind} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a damaged archive fails in many ways (fuzzed: also IndexError, KeyError, TypeError)
        raise DMDError(f"{kind} {path} is corrupt or not a dmd_minimal file ({reason(e)})") from None
    missing = [key for key in required if not isinstance(obj, dict) or key not in obj]
    if missing:
        raise DMDError(f"{kind} {path} is not a dmd_minimal {kind}: it lacks {', '.join(missing)}")
    return obj


def index_seed(seed, i):
    """A 32-bit seed mixed from (seed, i) (splitmix64's finaliser): torch's CPU generator keeps only
    32 bits of a seed, so seed * 2**32 + i would make every seed give the same noise."""
    z = (seed * 0x9E3779B97F4A7C15 + i) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**32 - 1)


def per_index_noise(indices, shape, seed, device="cpu"):
    """Unit-Gaussian noise [len(indices), *shape] where row i depends only on (seed, indices[i]).

    So sample i is the same whatever the batch size, the order or the number of processes.
    """
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(index_seed(seed, int(i))))
            for i in indices]
    return torch.stack(rows).to(device)


def rng_state():
    """Every RNG that training draws from, to store in a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cache_dir():
    """The folder for what the package derives once and reuses (decompressed data, trained classifiers):
    $DMD_CACHE, else ~/.cache/dmd_minimal."""
    return os.environ.get("DMD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dmd_minimal")


def tensor_hash(module):
    """A short sha256 of a module's parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
