"""Building denoisers by name, and storing them as plain dicts (architecture + weights).

A stored denoiser is {arch, arch_kwargs, sigma_data, label_dim, state_dict}: enough to rebuild it
without pickled code, so every checkpoint loads with torch.load(weights_only=True).
"""
from .adm import DhariwalUNet
from .denoiser import Denoiser
from .mlp import MLP
from .songunet import SongUNet
from .utils import DMDError, digest

ARCHS = {"mlp": MLP, "songunet": SongUNet, "dhariwalunet": DhariwalUNet}   # raw backbones F, by the name the config uses

# The image networks of EDM's released teachers (EDM train.py: --arch=ddpmpp --augment=0.12 for CIFAR-10,
# --arch=adm --augment=0 --dropout=0.10 for ImageNet-64; the rest are EDM's SongUNet / DhariwalUNet defaults).
# label_dim is the dataset's (CIFAR-10: 10 cond / 0 uncond, ImageNet: 1000); sigma_data = 0.5 for both.
# Use: build_denoiser(sigma_data=0.5, label_dim=10, **IMAGE_NETWORKS["cifar10"]).
IMAGE_NETWORKS = {
    "cifar10": dict(arch="songunet",               # DDPM++ as in edm-cifar10-32x32-{cond,uncond}-vp.pkl
                    img_resolution=32, in_channels=3, out_channels=3,
                    model_channels=128,
                    channel_mult=[2, 2, 2],
                    channel_mult_emb=4,
                    num_blocks=4,
                    attn_resolutions=[16],
                    dropout=0.13,                  # EDM's teacher training; DMD loads it with 0
                    label_dropout=0.0,
                    embedding_type="positional",
                    channel_mult_noise=1,
                    encoder_type="standard",
                    decoder_type="standard",
                    resample_filter=[1, 1],
                    augment_dim=9),                # EDM's non-leaking augmentation labels
    "imagenet64": dict(arch="dhariwalunet",        # ADM as in edm-imagenet-64x64-cond-adm.pkl
                       img_resolution=64, in_channels=3, out_channels=3,
                       model_channels=192,
                       channel_mult=[1, 2, 3, 4],
                       channel_mult_emb=4,
                       num_blocks=3,
                       attn_resolutions=[32, 16, 8],
                       dropout=0.10,               # EDM's teacher training; DMD loads it with 0
                       label_dropout=0.0,
                       augment_dim=0),             # trained without augmentation
}


def build_denoiser(arch, sigma_data, label_dim=0, **arch_kwargs):
    """A Denoiser around a freshly initialised backbone `arch`."""
    if arch not in ARCHS:
        raise DMDError(f"unknown network architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return Denoiser(ARCHS[arch](label_dim=label_dim, **arch_kwargs), sigma_data, label_dim)


def sample_shape(denoiser):
    """The shape of one sample x the denoiser takes: (dim,) for the MLP, (channels, H, W) for the image networks."""
    config = denoiser.backbone.config
    if "dim" in config:
        return (config["dim"],)
    return (config["in_channels"], config["img_resolution"], config["img_resolution"])


def denoiser_to_dict(denoiser):
    arch = {cls: name for name, cls in ARCHS.items()}[type(denoiser.backbone)]
    arch_kwargs = {k: v for k, v in denoiser.backbone.config.items() if k != "label_dim"}
    return dict(arch=arch, arch_kwargs=arch_kwargs, sigma_data=denoiser.sigma_data,
                label_dim=denoiser.label_dim, state_dict=denoiser.state_dict())


def denoiser_hash(denoiser):
    """The identity of a denoiser: 12 hex digits of the sha256 of denoiser_to_dict (architecture and weights)."""
    return digest(denoiser_to_dict(denoiser))[:12]


def denoiser_from_dict(stored):
    denoiser = build_denoiser(stored["arch"], stored["sigma_data"], stored["label_dim"], **stored["arch_kwargs"])
    denoiser.load_state_dict(stored["state_dict"])
    return denoiser
