"""Reading EDM's network snapshots (edm-*.pkl) without EDM's code and without running the pickle.

EDM (Karras et al., arXiv 2206.00364; github.com/NVlabs/edm) saves each snapshot as a pickled dict
{ema, loss_fn, augment_pipe, dataset_kwargs}. Every EDM object in it is rebuilt by a hook,
torch_utils.persistence._reconstruct_persistent_obj(meta), where meta = {type, version, module_src,
class_name, state}: the source code of the class's module (which EDM executes when loading) and the
object's __dict__. We never execute it. A restricted unpickler admits only the globals such a file
needs, replaces the hook by one that records (class_name, state), and rebuilds tensors through
torch.load(weights_only=True). The architecture then comes from the stored constructor arguments of
EDMPrecond, the weights from the recorded module tree, and dmd_minimal's own SongUNet / DhariwalUNet
(same parameter names) receives them with strict=True.
"""
import collections
import io
import pickle
import warnings

import numpy as np
import torch

from .networks import build_denoiser
from .utils import DMDError, reason

EDM_ARCHS = {"SongUNet": "songunet", "DhariwalUNet": "dhariwalunet"}   # EDM model_type -> our ARCHS name
PRECOND_ONLY_KWARGS = ("use_fp16", "sigma_min", "sigma_max")          # EDMPrecond's, not the backbone's
MAX_DEPTH = 16   # of the module tree; EDM's networks nest 4 deep (EDMPrecond.model.enc[name].conv0)


class StoredModule:
    """A module as the file stores it: its class name and its __dict__ (_parameters, _buffers, _modules, ...)."""
    class_name = "ModuleDict"   # torch containers arrive through pickle's NEWOBJ + BUILD, EDM's through the hook
    state = None

    def __setstate__(self, state):
        self.state = state


class PlainDict(dict):
    """dnnlib.EasyDict (EDM's attribute dict), read as a plain dict."""


def persistent_object(meta):
    """Stands in for EDM's _reconstruct_persistent_obj: records the object, never runs meta['module_src']."""
    module = StoredModule()
    module.class_name, module.state = meta["class_name"], meta["state"]
    return module


def storage_from_bytes(data):
    """Stands in for torch.storage._load_from_bytes, which would torch.load the bytes with full unpickling."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def tensor_from_storage(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """torch's own tensor rebuild, without the stored requires_grad or hooks."""
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def parameter_data(data, *requires_grad_hooks_and_state):
    """A stored nn.Parameter as its plain tensor."""
    return data


def numpy_scalar(dtype, data):
    """A numeric numpy scalar (EDM keeps e.g. skip_scale = np.sqrt(0.5)) as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf":
        raise DMDError(f"refusing a numpy scalar of dtype {dtype!r}: only numbers are expected")
    return np.frombuffer(data, dtype=dtype)[0].item()


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): persistent_object,
    ("torch.storage", "_load_from_bytes"): storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): tensor_from_storage,
    ("torch._utils", "_rebuild_parameter"): parameter_data,
    ("torch._utils", "_rebuild_parameter_with_state"): parameter_data,
    ("torch.nn.modules.container", "ModuleDict"): StoredModule,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,                                # how pickle protocols < 4 write a set
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,       # numpy < 2
    ("numpy._core.multiarray", "scalar"): numpy_scalar,      # numpy >= 2
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS, so a hostile file cannot reach any other callable."""

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise DMDError(f"refusing to load: the pickle references {module}.{name}, "
                           f"which an EDM network snapshot does not need")
        return ALLOWED_GLOBALS[(module, name)]


def read_snapshot(path):
    """The unpickled top-level object of an EDM snapshot, with every module as a StoredModule."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)     # TypedStorage deprecation, from torch.load
            return RestrictedUnpickler(f).load()
    except DMDError:
        raise
    except Exception as e:   # a damaged pickle can fail in many ways; all mean the same to the user
        raise DMDError(f"{path} is corrupt or not an EDM network snapshot ({reason(e)})") from None


def stored_state_dict(module, prefix="", seen=None):
    """The state_dict of a StoredModule tree: parameters, persistent buffers, then each child's, in order.

    Each module is visited once and at most MAX_DEPTH deep, so a damaged or hostile file whose module
    tree loops back on itself gives an error instead of endless recursion.
    """
    seen = set() if seen is None else seen
    where = prefix.rstrip(".") or "the network"
    if not isinstance(module, StoredModule) or not isinstance(module.state, dict):
        raise DMDError(f"the network snapshot stores {where} in an unexpected form")
    if id(module) in seen or prefix.count(".") >= MAX_DEPTH:
        raise DMDError(f"the network snapshot's module tree loops back or nests too deep at {where}")
    seen.add(id(module))
    parameters, buffers, children = (module.state.get(key) or {} for key in ("_parameters", "_buffers", "_modules"))
    transient = module.state.get("_non_persistent_buffers_set") or set()
    if not all(isinstance(part, dict) for part in (parameters, buffers, children)) or not isinstance(transient, set):
        raise DMDError(f"the network snapshot stores {where} in an unexpected form")
    tensors = {f"{prefix}{name}": t for name, t in parameters.items() if t is not None}
    tensors.update({f"{prefix}{name}": t for name, t in buffers.items() if t is not None and name not in transient})
    for name, child in children.items():
        if child is not None:
            tensors.update(stored_state_dict(child, f"{prefix}{name}.", seen))
    return tensors


def edm_backbone_kwargs(precond_kwargs, path):
    """(arch, sigma_data, label_dim, backbone kwargs) from EDMPrecond's stored constructor arguments."""
    kwargs = dict(precond_kwargs)
    model_type = kwargs.pop("model_type", "DhariwalUNet")    # EDMPrecond's default
    if model_type not in EDM_ARCHS:
        raise DMDError(f"{path} uses the network {model_type!r}; supported: {', '.join(EDM_ARCHS)}")
    sigma_data = float(kwargs.pop("sigma_data", 0.5))
    label_dim = int(kwargs.pop("label_dim", 0))
    channels = kwargs.pop("img_channels")
    for name in PRECOND_ONLY_KWARGS:   # fp16 is chosen by our Denoiser.amp_dtype; sigma limits only clip sampling
        kwargs.pop(name, None)
    return EDM_ARCHS[model_type], sigma_data, label_dim, dict(kwargs, in_channels=channels, out_channels=channels)


def denoiser_from_edm_snapshot(path, dropout=0.0):
    """The Denoiser of an EDM snapshot's `ema` network (EDMPrecond), its dropout set to `dropout`.

    dropout=None keeps the stored rate (EDM's CIFAR-10 nets were trained with 0.13); DMD uses 0.
    """
    snapshot = read_snapshot(path)
    ema = snapshot.get("ema") if isinstance(snapshot, dict) else None
    if not isinstance(ema, StoredModule):
        raise DMDError(f"{path} is not an EDM network snapshot: it has no 'ema' network")
    if ema.class_name != "EDMPrecond":
        raise DMDError(f"{path} holds a {ema.class_name} network; only EDMPrecond (EDM's edm-*.pkl) is supported")
    if not isinstance(ema.state, dict) or not isinstance(ema.state.get("_init_kwargs"), dict) or ema.state.get("_init_args"):
        raise DMDError(f"{path} does not record EDMPrecond's constructor arguments")
    try:
        arch, sigma_data, label_dim, kwargs = edm_backbone_kwargs(ema.state["_init_kwargs"], path)
        if dropout is not None:
            kwargs["dropout"] = dropout
        denoiser = build_denoiser(arch, sigma_data, label_dim, **kwargs)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:   # RuntimeError: e.g. a negative width
        raise DMDError(f"{path}: cannot rebuild the network from its stored arguments ({reason(e)})") from None
    state_dict = {}
    for name, tensor in stored_state_dict(ema).items():
        if not name.startswith("model."):
            raise DMDError(f"{path}: unexpected tensor {name} outside EDMPrecond.model")
        state_dict["backbone." + name[len("model."):]] = tensor      # EDMPrecond.model -> Denoiser.backbone
    try:
        denoiser.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        details = " ".join(line.strip() for line in str(e).splitlines()[1:])[:300]
        raise DMDError(f"{path}: its weights do not fit the rebuilt {arch}: {details}") from None
    return denoiser.eval()
