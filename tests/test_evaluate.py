"""FID and IS: the Fréchet distance against closed forms, the statistics pipeline and the CLI with a small
stand-in feature extractor (Inception's weights need a download), and the real Inception where present."""
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn

from dmd_minimal.data import load_dataset
from dmd_minimal.evaluate import (INCEPTION_URL, InceptionV3, array_batches, feature_statistics, frechet_distance,
                                  inception_score, load_images, load_ref, main)
from dmd_minimal.load import cache_path
from dmd_minimal.utils import DMDError
from test_data import write_cifar


class StandIn(nn.Module):
    """A fixed random conv net in Inception's place: features [B, 6] and logits [B, 4] of uint8 images."""
    name = "stand-in"

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.classifier = nn.Linear(6, 4)

    def forward(self, images):
        x = images.float() / 127.5 - 1                                   # [B, 3, H, W]
        features = torch.tanh(self.conv(x)).mean((2, 3))                 # [B, 6], any resolution
        return features, 5 * self.classifier(features)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    # commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FID = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    Q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, Q @ np.diag(a) @ Q.T, mu2, Q @ np.diag(b) @ Q.T) == pytest.approx(expected, rel=1e-8)
    # any covariances: the symmetric form Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), through eigendecompositions
    S1, S2 = random_spd(rng, 6), random_spd(rng, 6)
    w, V = np.linalg.eigh(S1)
    root1 = V @ np.diag(np.sqrt(w)) @ V.T
    inner = np.linalg.eigvalsh(root1 @ S2 @ root1)
    expected = np.trace(S1 + S2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(np.zeros(6), S1, np.zeros(6), S2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(np.zeros(6), S2, np.zeros(6), S1) == pytest.approx(expected, rel=1e-8)
    assert abs(frechet_distance(mu1, S1[:5, :5], mu1, S1[:5, :5])) < 1e-8


def test_frechet_distance_of_singular_covariances_matches_closed_forms():
    # S2 = b b^T (rank 1): (S1^1/2 S2 S1^1/2)^1/2 = c c^T / |c| with c = S1^1/2 b, so its trace is sqrt(b^T S1 b)
    S1 = np.array([[3., -3, -2, -3], [-3, 3, 2, 3], [-2, 2, 2, 2], [-3, 3, 2, 3]])   # rank 2
    b = np.array([1., 1, -1, 1])
    mu1, mu2 = np.array([1., 0, 0, 0]), np.zeros(4)
    expected = 1 + np.trace(S1) + b @ b - 2 * np.sqrt(b @ S1 @ b)   # 1 + 11 + 4 - 2 = 14
    # SciPy finds no square root of the singular product S1 S2 (1.17: NaN), so the fallback nudges both
    # covariances by 1e-6 I: an error of order sqrt(1e-6) per zero eigenvalue
    assert frechet_distance(mu1, S1, mu2, np.outer(b, b)) == pytest.approx(expected, abs=0.02)
    # fewer samples than dimensions (20 of 64-d features): both covariances singular, the symmetric form as above
    rng = np.random.default_rng(0)
    S1, S2 = np.cov(rng.normal(size=(20, 64)), rowvar=False), np.cov(rng.normal(1, 2, size=(20, 64)), rowvar=False)
    w, V = np.linalg.eigh(S1)
    root1 = V @ np.diag(np.sqrt(w.clip(0))) @ V.T
    expected = np.trace(S1 + S2) - 2 * np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ S2 @ root1).clip(0)))
    assert frechet_distance(np.zeros(64), S1, np.zeros(64), S2) == pytest.approx(expected, rel=1e-4)


def test_inception_score_closed_forms():
    K = 4
    confident = torch.full((40, K), -torch.inf)
    confident[torch.arange(40), torch.arange(40) % K] = 0          # p(y|x) one-hot, p(y) uniform
    assert inception_score(confident, splits=2) == pytest.approx((K, 0), abs=1e-9)
    assert inception_score(torch.zeros(40, K), splits=2) == pytest.approx((1, 0), abs=1e-9)   # p(y|x) = p(y)
    assert inception_score(confident[torch.zeros(40, dtype=torch.long)])[0] == pytest.approx(1)  # one class


def test_streamed_statistics_equal_numpy_on_all_features():
    extractor = StandIn()
    images = np.random.default_rng(0).integers(0, 256, (37, 12, 12, 3), dtype=np.uint8)
    with torch.no_grad():
        features = extractor(torch.from_numpy(images).permute(0, 3, 1, 2))[0].double().numpy()   # [37, 6]
    for batch_size in (5, 37):
        mu, sigma, n, logits = feature_statistics(array_batches(images, batch_size), extractor, keep_logits=True)
        assert n == 37 and logits.shape == (37, 4)
        np.testing.assert_allclose(mu, features.mean(0), rtol=1e-6)
        np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-12)


def test_samples_from_npz_and_png_folders_and_bad_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images)                                   # arr_0, as ADM's evaluator
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(tmp_path / "pngs" / f"{i:06d}.png")
    assert np.array_equal(load_images(tmp_path / "samples.npz"), images)
    assert np.array_equal(load_images(tmp_path / "pngs"), images)
    gray = images[..., :1]                                                       # [5, 8, 8, 1]
    np.savez(tmp_path / "gray.npz", gray)
    (tmp_path / "gray").mkdir()
    for i, image in enumerate(gray):
        PIL.Image.fromarray(image[:, :, 0]).save(tmp_path / "gray" / f"{i:06d}.png")
    assert np.array_equal(load_images(tmp_path / "gray.npz"), gray)
    assert np.array_equal(load_images(tmp_path / "gray"), gray)

    np.savez(tmp_path / "float.npz", images.astype(np.float32))
    np.savez(tmp_path / "named.npz", x=images)
    (tmp_path / "empty").mkdir()
    (tmp_path / "pngs" / "000009.png").write_bytes(b"not a png")
    for path, message in [("float.npz", r"arr_0 is float32 \[5, 8, 8, 3\], not uint8 \[N, H, W, C\], C = 1 or 3"),
                          ("named.npz", "has no arr_0"), ("empty", "holds no .png files"),
                          ("missing.npz", "neither an .npz file nor a folder of PNGs"),
                          ("pngs", r"000009.png is not a readable PNG")]:
        with pytest.raises(DMDError, match=message) as error:
            load_images(tmp_path / path)
        assert "\n" not in str(error.value)


def test_cli_with_the_stand_in_extractor(tmp_path, capsys):
    extractor = StandIn()
    write_cifar(tmp_path / "data", per_batch=12)                                   # 60 CIFAR-10 images
    ref = tmp_path / "refs" / "cifar10.npz"
    main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--save-ref", str(ref)], extractor)
    assert "wrote the reference statistics of 60 cifar10 images" in capsys.readouterr().out

    # the training images themselves as samples: FID 0, from an npz and from PNGs alike
    dataset = load_dataset("cifar10", tmp_path / "data")
    real = np.stack([((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy() for x, _ in dataset])
    np.savez(tmp_path / "real.npz", real)
    result = main(["--samples", str(tmp_path / "real.npz"), "--ref", str(ref), "--batch-size", "7"], extractor)
    assert abs(result["fid"]) < 1e-6 and result["num_samples"] == 60
    assert "FID 0.000" in capsys.readouterr().out

    fake = np.clip(real.astype(int) // 2 + 40, 0, 255).astype(np.uint8)          # darker, lower contrast
    (tmp_path / "fake").mkdir()
    for i, image in enumerate(fake):
        PIL.Image.fromarray(image).save(tmp_path / "fake" / f"{i:06d}.png")
    result = main(["--samples", str(tmp_path / "fake"), "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                   "--save-ref", str(ref)], extractor)
    assert "cached" in capsys.readouterr().out
    mu_ref, sigma_ref = load_ref(ref, extractor.name)
    mu, sigma, _, logits = feature_statistics(array_batches(fake, 60), extractor, keep_logits=True)
    assert result["fid"] == pytest.approx(frechet_distance(mu, sigma, mu_ref, sigma_ref), rel=1e-6)
    assert result["fid"] > 1e-3
    assert result["inception_score"] == pytest.approx(inception_score(logits)[0])

    for argv, message in [([], "either --ref FILE or --dataset"),
                          (["--ref", str(ref)], "nothing to do"),
                          (["--samples", str(tmp_path / "fake"), "--ref", str(tmp_path / "fake" / "000000.png")],
                           "is not an .npz with mu and sigma")]:
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            main(argv, extractor)
    np.savez(tmp_path / "other.npz", mu=mu, sigma=sigma, extractor="inception-2015-12-05")
    with pytest.raises(SystemExit, match="holds inception-2015-12-05 statistics, not stand-in: recompute"):
        main(["--samples", str(tmp_path / "fake"), "--ref", str(tmp_path / "other.npz")], extractor)


def test_offline_inception_is_a_one_line_error(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    np.savez(tmp_path / "samples.npz", np.zeros((2, 8, 8, 3), np.uint8))
    cache = cache_path(INCEPTION_URL)
    assert os.path.basename(cache).startswith("weights-inception-2015-12-05-6726825d.url-")
    assert os.path.dirname(cache) == os.path.join(tmp_path, "torch", "hub", "checkpoints")
    with pytest.raises(SystemExit) as error:
        main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz")])
    assert str(error.value) == (f"error: FID needs the Inception-v3 weights {INCEPTION_URL} and cannot download them: "
                                f"put that file at {cache} or pass --inception-weights FILE")
    (tmp_path / "bad.pth").write_bytes(b"not a state_dict")
    for name, problem in [("missing.pth", "do not exist"), ("bad.pth", "are corrupt or not a plain state_dict")]:
        with pytest.raises(SystemExit, match=rf"^error: Inception weights .*{name} {problem}: download [^\n]*$"):
            main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
                  "--inception-weights", str(tmp_path / name)])


def test_real_inception_features():
    path = cache_path(INCEPTION_URL)
    if not os.path.isfile(path):
        pytest.skip(f"Inception weights not downloaded ({path}): they need internet")
    inception = InceptionV3(path)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    features, logits = inception(images)
    assert features.shape == (4, 2048) and logits.shape == (4, 1008)
    assert (features >= 0).all()                               # pool_3 averages ReLU outputs
    np.testing.assert_allclose(inception(images[:2])[0], features[:2], rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # imports torch-fidelity and runs a full-size Inception-v3 twice: ~10 s on 2 cores
def test_inception_wrapper_on_a_weights_file_in_torch_fidelitys_layout(tmp_path, monkeypatch):
    """The real loading path (weights check, torch-fidelity's network, its outputs) on random weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    torch.save({}, tmp_path / "empty.pth")
    with monkeypatch.context() as patch:     # build the architecture without weights to get its state_dict
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        random_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(tmp_path / "empty.pth"))
    torch.save(random_net.state_dict(), tmp_path / "weights.pth")
    inception = InceptionV3(str(tmp_path / "weights.pth"))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8))
    features, logits = inception(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.equal(features, random_net(images)[0])
