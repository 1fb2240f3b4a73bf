"""load_denoiser and convert_edm on files in their real formats: EDM snapshots, our teacher files and checkpoints.

The EDM snapshots are built here with a pickler of our own that lays objects out the way EDM's
torch_utils/persistence.py does (the reconstruct hook with meta = {type, version, module_src, class_name,
state}); no EDM code is involved, and the loader must never run module_src or any other pickled code.
"""
import hashlib
import math
import os
import pickle
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from dmd_minimal import load_denoiser
from dmd_minimal.convert_edm import main as convert_main
from dmd_minimal.load import cached_download
from dmd_minimal.networks import build_denoiser, denoiser_from_dict, denoiser_to_dict
from dmd_minimal.utils import DMDError, atomic_save
from test_edm_networks import extra_inputs, tiny_denoiser


def _reconstruct_persistent_obj(meta):   # pickled by reference as torch_utils.persistence._reconstruct_persistent_obj
    raise AssertionError("the loader called the pickled reconstruct hook")


class Persistent:
    """Pickles as an EDM persistent object: the reconstruct hook, called with its meta dict."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, class_name=self.class_name, state=self.state,
                    module_src="raise RuntimeError('module_src was executed')")
        return _reconstruct_persistent_obj, (meta,)


class Payload:
    """Pickles as a call of `function(*args)`: what a hostile file would run when loaded."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def edm_layout(module):
    """`module` as EDM's pickles hold it: torch containers stay themselves, every other module is persistent."""
    children = {name: edm_layout(child) for name, child in module._modules.items()}
    if isinstance(module, nn.ModuleDict):
        container = nn.ModuleDict()
        container.__dict__["_modules"] = children
        return container
    return Persistent(type(module).__name__, dict(module.__dict__, _modules=children))


def edm_snapshot(denoiser, precond="EDMPrecond"):
    """The dict EDM's training loop pickles, around `denoiser`'s network as EDMPrecond.model."""
    config = dict(denoiser.backbone.config)
    resolution, channels = config.pop("img_resolution"), config.pop("in_channels")
    config.pop("out_channels"), config.pop("label_dim")
    init_kwargs = dict(img_resolution=resolution, img_channels=channels, label_dim=denoiser.label_dim,
                       model_type=type(denoiser.backbone).__name__, **config, use_fp16=False)   # EDM's class names
    state = dict(training=False, _parameters={}, _buffers={}, _non_persistent_buffers_set=set(),
                 _modules={"model": edm_layout(denoiser.backbone)}, img_resolution=resolution, img_channels=channels,
                 label_dim=denoiser.label_dim, use_fp16=False, sigma_min=0, sigma_max=math.inf,
                 sigma_data=denoiser.sigma_data, _init_args=(), _init_kwargs=init_kwargs)
    loss_fn = Persistent("EDMLoss", dict(P_mean=np.float64(-1.2), P_std=np.float64(1.2), sigma_data=0.5,
                                         _init_args=(), _init_kwargs={}))
    return dict(ema=Persistent(precond, state), loss_fn=loss_fn, augment_pipe=None,
                dataset_kwargs=dict(path="datasets/cifar10-32x32.zip", use_labels=True))


@pytest.fixture
def write_pickle(tmp_path, monkeypatch):
    """write_pickle(obj, name) -> path: pickles obj while a stand-in torch_utils.persistence is importable."""
    def write(obj, name="network-snapshot.pkl"):
        hook_module = types.ModuleType("torch_utils.persistence")
        hook_module._reconstruct_persistent_obj = _reconstruct_persistent_obj
        with monkeypatch.context() as patch:   # gone again before anything is loaded
            patch.setattr(_reconstruct_persistent_obj, "__module__", "torch_utils.persistence")
            patch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
            patch.setitem(sys.modules, "torch_utils.persistence", hook_module)
            data = pickle.dumps(obj, protocol=4)
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return write


def assert_same_outputs(a, b, batch=3):
    x = torch.randn(batch, 3, 16, 16)
    labels, kwargs = extra_inputs(a, batch)
    with torch.no_grad():
        for sigma in (0.002, 1.0, 80.0):
            assert torch.equal(a(x * (1 + sigma), sigma, labels, **kwargs), b(x * (1 + sigma), sigma, labels, **kwargs))


@pytest.mark.parametrize("name, label_dim", [("ddpmpp-augment", 10), ("ddpmpp", 0), ("ncsnpp", 10), ("adm", 10)])
def test_edm_snapshot_loads_into_the_same_network(write_pickle, name, label_dim):
    source = tiny_denoiser(name, label_dim=label_dim)
    loaded = load_denoiser(write_pickle(edm_snapshot(source)))
    assert type(loaded.backbone) is type(source.backbone) and loaded.label_dim == label_dim
    assert loaded.backbone.config == source.backbone.config
    assert_same_outputs(source, loaded)
    assert "torch_utils" not in sys.modules


def test_edm_snapshot_dropout_is_zeroed_unless_kept(write_pickle):
    source = tiny_denoiser("ddpmpp")
    source.backbone.config["dropout"] = 0.13              # as in EDM's CIFAR-10 snapshots
    path = write_pickle(edm_snapshot(source))
    assert load_denoiser(path).backbone.config["dropout"] == 0.0
    assert load_denoiser(path, dropout=None).backbone.config["dropout"] == 0.13


@pytest.mark.parametrize("function, global_name", [(os.system, f"{os.system.__module__}.system"),
                                                   (eval, "builtins.eval")])
def test_snapshot_with_any_other_global_is_refused_before_it_runs(write_pickle, tmp_path, function, global_name):
    marker = tmp_path / "pwned"
    action = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
    path = write_pickle(dict(payload=Payload(function, action), **edm_snapshot(tiny_denoiser("ddpmpp"))))
    with pytest.raises(DMDError, match=global_name.replace(".", r"\.")) as error:
        load_denoiser(path)
    assert not marker.exists() and "\n" not in str(error.value)
    with pytest.raises(ModuleNotFoundError, match="torch_utils"):
        pickle.loads(path.read_bytes())                   # plain pickle runs the payload, then needs EDM's code
    assert marker.exists()


def test_only_edm_preconditioning_is_supported(write_pickle):
    path = write_pickle(edm_snapshot(tiny_denoiser("ddpmpp"), precond="VPPrecond"))
    with pytest.raises(DMDError, match="only EDMPrecond"):
        load_denoiser(path)


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", "truncated"])
def test_missing_corrupt_or_foreign_files_give_one_line_errors(write_pickle, tmp_path, content):
    with pytest.raises(DMDError, match="does not exist"):
        load_denoiser(tmp_path / "missing.pkl")
    if content == "truncated":
        path = write_pickle(edm_snapshot(tiny_denoiser("ddpmpp")))
        path.write_bytes(path.read_bytes()[:5000])
    else:
        (path := tmp_path / "bad.pkl").write_bytes(content)
    with pytest.raises(DMDError) as error:
        load_denoiser(path)
    assert "\n" not in str(error.value)


def test_unknown_formats_are_refused(write_pickle, tmp_path):
    atomic_save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(DMDError, match="neither a denoiser file nor a training checkpoint"):
        load_denoiser(tmp_path / "other.pt")
    with pytest.raises(DMDError, match="no 'ema' network"):
        load_denoiser(write_pickle({"weights": [1, 2, 3]}))


def test_our_teacher_files_and_checkpoints(tmp_path):
    nets = {name: tiny_denoiser("ddpmpp", label_dim=10, seed=seed)
            for seed, name in enumerate(("teacher", "generator", "fake_score"))}
    nets["teacher"].backbone.config["dropout"] = 0.1
    atomic_save(dict(config={}, denoiser=denoiser_to_dict(nets["teacher"])), tmp_path / "teacher.pt")
    atomic_save(dict(config={}, step=3, **{name: denoiser_to_dict(net) for name, net in nets.items()}),
                tmp_path / "checkpoint.pt")
    assert_same_outputs(nets["teacher"], load_denoiser(tmp_path / "teacher.pt"))
    for name, net in nets.items():
        loaded = load_denoiser(tmp_path / "checkpoint.pt", which=name)
        assert_same_outputs(net, loaded)
    assert load_denoiser(tmp_path / "checkpoint.pt").backbone.config["dropout"] == 0.0
    with pytest.raises(DMDError, match="needs a training checkpoint"):
        load_denoiser(tmp_path / "teacher.pt", which="generator")


def test_url_is_downloaded_once_into_the_hub_cache_keyed_by_the_whole_url(write_pickle, tmp_path, monkeypatch):
    served = {}   # url -> the denoiser behind it
    downloads = []

    def fake_download(url, dst, *args, **kwargs):          # no network in tests
        downloads.append(url)
        with open(dst, "wb") as f:
            f.write(write_pickle(edm_snapshot(served[url]), "served.pkl").read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    urls = ["https://example.com/edm/pretrained/edm-tiny.pkl", "https://example.org/other/edm-tiny.pkl"]
    for seed, url in enumerate(urls):   # the same file name on two hosts: two files, never one for both
        served[url] = tiny_denoiser("ddpmpp", label_dim=10, seed=seed)
    for _ in range(2):
        for url in urls:
            assert_same_outputs(served[url], load_denoiser(url))
    assert downloads == urls
    cached = sorted(name for name in os.listdir(tmp_path / "hub" / "checkpoints") if not name.endswith(".lock"))
    assert len(cached) == 2 and all(name.startswith("edm-tiny.url-") and name.endswith(".pkl") for name in cached)


def test_a_hash_in_the_file_name_is_verified(tmp_path, monkeypatch):
    """torch.hub's convention (vgg16-397923af.pth): the name ends in the first hex digits of the file's SHA-256."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    data = b"the published weights"
    digest = hashlib.sha256(data).hexdigest()
    for name in (f"weights-{digest[:8]}.pth", "weights-00000000.pth", "weights.pth"):
        (tmp_path / name).write_bytes(data)
    assert open(cached_download((tmp_path / f"weights-{digest[:8]}.pth").as_uri()), "rb").read() == data
    assert open(cached_download((tmp_path / "weights.pth").as_uri()), "rb").read() == data    # no hash: none checked
    with pytest.raises(DMDError, match=f'cannot download .*weights-00000000.pth .*expected "00000000", got "{digest}"'):
        cached_download((tmp_path / "weights-00000000.pth").as_uri())
    downloaded = [name for name in os.listdir(tmp_path / "hub" / "checkpoints") if not name.endswith(".lock")]
    assert len(downloaded) == 2                                          # nothing left of the rejected download


def test_convert_edm_cli(write_pickle, tmp_path, capsys):
    source = tiny_denoiser("ddpmpp-augment", label_dim=10)
    out = tmp_path / "converted" / "teacher.pt"
    convert_main([str(write_pickle(edm_snapshot(source))), str(out)])
    assert capsys.readouterr().out.startswith(f"wrote {out}: songunet, label_dim 10")
    stored = torch.load(out, weights_only=True)
    assert_same_outputs(source, denoiser_from_dict(stored["denoiser"]).eval())
    assert_same_outputs(source, load_denoiser(out))

    with pytest.raises(SystemExit) as error:   # what `python -m` prints to stderr, in one line
        convert_main([str(tmp_path / "missing.pkl"), str(tmp_path / "x.pt")])
    message = str(error.value.code)
    assert message.startswith("error:") and "missing.pkl" in message and "\n" not in message
    assert not (tmp_path / "x.pt").exists()


def test_a_module_tree_that_loops_back_is_a_one_line_error(write_pickle, tmp_path):
    snapshot = edm_snapshot(tiny_denoiser("ddpmpp"))
    encoder = snapshot["ema"].state["_modules"]["model"].state["_modules"]["enc"]   # an nn.ModuleDict
    encoder.__dict__["_modules"]["itself"] = encoder
    with pytest.raises(SystemExit) as error:
        convert_main([str(write_pickle(snapshot)), str(tmp_path / "x.pt")])
    message = str(error.value.code)
    assert "module tree loops back" in message and "model.enc.itself" in message and "\n" not in message


def test_stored_arguments_that_cannot_build_a_network_are_a_one_line_error(write_pickle):
    snapshot = edm_snapshot(tiny_denoiser("ddpmpp"))
    snapshot["ema"].state["_init_kwargs"]["model_channels"] = -16   # what one damaged byte made of 16
    with pytest.raises(DMDError, match="cannot rebuild the network from its stored arguments") as error:
        load_denoiser(write_pickle(snapshot))
    assert "\n" not in str(error.value)


def damaged_copies(data, count, seed=0):
    """`count` copies of data, each with 1-4 bytes overwritten at random offsets or cut short at one."""
    rng = random.Random(seed)
    for _ in range(count):
        copy = bytearray(data)
        if rng.random() < 0.3:
            del copy[rng.randrange(len(copy)):]
        else:
            for _ in range(rng.randint(1, 4)):
                copy[rng.randrange(len(copy))] = rng.randrange(256)
        yield bytes(copy)


@pytest.mark.filterwarnings("ignore")   # torch.load warns about a damaged pickle protocol number
def test_damaged_files_give_only_one_line_errors(write_pickle, tmp_path):
    """Small files, so that most damage hits the structure (zip records, pickle opcodes), not the weights."""
    ours = tmp_path / "teacher.pt"
    atomic_save(dict(denoiser=denoiser_to_dict(build_denoiser("mlp", 1.0, 3, hidden=8, depth=1))), ours)
    edm = write_pickle(edm_snapshot(build_denoiser("songunet", 0.5, 3, img_resolution=4, model_channels=4,
                                                   channel_mult=[1], channel_mult_emb=1, num_blocks=1,
                                                   attn_resolutions=[], dropout=0.0)))
    outcomes = []
    for path, count in ((ours, 300), (edm, 150)):
        for data in damaged_copies(path.read_bytes(), count):
            (damaged := tmp_path / f"damaged{path.suffix}").write_bytes(data)
            try:
                load_denoiser(damaged)
                outcomes.append("loaded")
            except DMDError as e:
                assert "\n" not in str(e)
                outcomes.append("error")
    assert outcomes.count("error") > len(outcomes) / 2
