"""Small shared helpers: user-facing errors, progress bars, locks, atomic checksummed files, per-index noise."""
import contextlib
import fcntl
import hashlib
import os
import socket
import tempfile

import torch


class DMDError(Exception):
    """A problem with the user's input: the command line prints it as one line, without a traceback."""


def reason(e):
    """The first line of an exception's message, for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_option(ok, flag, value, must):
    """One-line error for an option out of its range: "--batch-size must be >= 1, not 0"."""
    if not ok:
        raise DMDError(f"{flag} must be {must}, not {value}")


def check_at_least(options, lowest):
    """check_option for each of options' fields (argparse's namespace) against its lowest value {name: lowest}."""
    for name, low in lowest.items():
        value = getattr(options, name)
        check_option(value >= low, "--" + name.replace("_", "-"), value, f">= {low}")


def hide_progress(rank=0):
    """Whether to hide a tqdm bar: on every process but 0, and everywhere with TQDM_DISABLE=1 in the
    environment (tqdm itself reads that variable only where a call leaves `disable` unset)."""
    return rank > 0 or os.environ.get("TQDM_DISABLE", "") not in ("", "0")


def check_writable(folder, flag="--out"):
    """One-line error unless files can be made in folder (created if missing), checked before any work is done.

    It makes a file rather than asking os.access, which says yes to root in a read-only folder.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise DMDError(f"{flag} {folder} is not a folder this process can write into ({reason(e)})") from None


@contextlib.contextmanager
def file_lock(path, wait=True):
    """Hold an fcntl lock on the file at path (created if missing) for the with-block. The system releases it
    when the process ends, also after kill -9, so no stale lock outlives a crash. wait=False: BlockingIOError
    at once where another process holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield f


@contextlib.contextmanager
def run_lock(folder):
    """One run per output folder: hold FOLDER/.lock while the with-block runs; a second run stops at once with
    a one-line error that names the process holding it."""
    path = os.path.join(folder, ".lock")
    lock = file_lock(path, wait=False)
    try:
        f = lock.__enter__()
    except BlockingIOError:
        with open(path) as held:
            holder = held.read().strip() or "another process"
        raise DMDError(f"{folder} is in use by another run ({holder}): wait for it to end or stop it, "
                       f"or use another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        lock.__exit__(None, None, None)


def atomic_write(path, write, before_replace=None):
    """Call write(f) on a temporary file in the same folder, then rename: never a half-written file.

    An OSError (a full disk, a read-only folder, ...) becomes a one-line error, the old file left as it was.
    before_replace(): called once the file is written, just before it takes its name.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            if before_replace is not None:
                before_replace()
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        raise DMDError(f"cannot write {path} ({reason(e)}); what it held before is intact") from None


def digest(obj):
    """sha256 (hex) of nested dicts / lists / tuples: keys, plain values and every tensor's dtype, shape and bytes."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, dict):
            for key, value in x.items():
                h.update(repr(key).encode())
                walk(value)
        elif isinstance(x, (list, tuple)):
            h.update(type(x).__name__.encode())
            for value in x:
                walk(value)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(x).encode())
    walk(obj)
    return h.hexdigest()


def atomic_save(obj, path, before_replace=None):
    """torch.save a dict atomically (atomic_write), with the digest of its contents under "checksum"
    (load_file checks it)."""
    atomic_write(path, lambda f: torch.save(dict(obj, checksum=digest(obj)), f), before_replace)


def load_file(path, kind, required=(), fix="", mmap=False):
    """torch.load a dict we wrote (weights_only), with one-line errors for missing, corrupt or damaged files.

    A file whose contents no longer match its checksum (a flipped bit on disk) is refused; `fix` ends the
    message of a corrupt or damaged file with the way to recover. mmap: map the tensors from the file
    instead of reading them into memory (their pages stay in the page cache, shared between processes).
    """
    path, fix = os.fspath(path), f"; {fix}" if fix else ""
    if not os.path.isfile(path):
        raise DMDError(f"{kind} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:   # a damaged archive fails in many ways (fuzzed: also IndexError, KeyError, TypeError)
        raise DMDError(f"{kind} {path} is corrupt or not a dmd_minimal file ({reason(e)}){fix}") from None
    missing = [key for key in required if not isinstance(obj, dict) or key not in obj]
    if missing:
        raise DMDError(f"{kind} {path} is not a dmd_minimal {kind}: it lacks {', '.join(missing)}")
    if isinstance(obj, dict) and "checksum" in obj:
        checksum = obj.pop("checksum")
        if digest(obj) != checksum:
            raise DMDError(f"{kind} {path} is damaged: its contents do not match the checksum saved with them{fix}")
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

