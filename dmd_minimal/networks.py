"""Building denoisers by name, and storing them as plain dicts (architecture + weights).

A stored denoiser is {arch, arch_kwargs, sigma_data, label_dim, state_dict}: enough to rebuild it
without pickled code, so every checkpoint loads with torch.load(weights_only=True).
"""
from .denoiser import Denoiser
from .mlp import MLP
from .utils import DMDError

ARCHS = {"mlp": MLP}   # raw backbones F, by the name the config uses


def build_denoiser(arch, sigma_data, label_dim=0, **arch_kwargs):
    """A Denoiser around a freshly initialised backbone `arch`."""
    if arch not in ARCHS:
        raise DMDError(f"unknown network architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return Denoiser(ARCHS[arch](label_dim=label_dim, **arch_kwargs), sigma_data, label_dim)


def denoiser_to_dict(denoiser):
    arch = {cls: name for name, cls in ARCHS.items()}[type(denoiser.backbone)]
    arch_kwargs = {k: v for k, v in denoiser.backbone.config.items() if k != "label_dim"}
    return dict(arch=arch, arch_kwargs=arch_kwargs, sigma_data=denoiser.sigma_data,
                label_dim=denoiser.label_dim, state_dict=denoiser.state_dict())


def denoiser_from_dict(stored):
    denoiser = build_denoiser(stored["arch"], stored["sigma_data"], stored["label_dim"], **stored["arch_kwargs"])
    denoiser.load_state_dict(stored["state_dict"])
    return denoiser
