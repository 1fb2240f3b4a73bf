"""Tutorial 03's pictures of the DMD gradient draw what dmd_loss computes, on one colour scale per row.

Oracle: the real data is N(a, s^2 I) and the generator's N(b, s^2 I), both exact (gaussian.py). Then
mu_real - mu_fake = sigma^2 / (s^2 + sigma^2) (a - b) at every x_t, so s_real - s_fake = (a - b) / (s^2 + sigma^2)
everywhere, and every sample's update -grad = w (mu_real - mu_fake) points from b to a, whatever the noise.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.contour  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.quiver  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dmd_minimal import viz  # noqa: E402
from dmd_minimal.gaussian import GaussianMixtureDenoiser  # noqa: E402

A, B, S = (3.0, 0.0), (-3.0, 0.0), 0.5          # the real and the fake mean, their std
SIGMAS = (0.5, 2.0)


@pytest.fixture
def rows():
    real, fake = GaussianMixtureDenoiser([A], S), GaussianMixtureDenoiser([B], S)
    x = fake.sample(30, torch.Generator().manual_seed(0))                       # [30, 2] the "generator's" samples
    return [viz.dmd_fields(real, fake, x, sigma, n=9, num_noise=4) for sigma in SIGMAS]


def bands(ax):
    """The filled contours of |field| that score_map drew on ax."""
    (contours,) = [c for c in ax.collections if isinstance(c, matplotlib.contour.ContourSet)]
    return contours


def magnitude_of_difference(sigma):
    return np.hypot(A[0] - B[0], A[1] - B[1]) / (S**2 + sigma**2)


def test_dmd_fields_against_the_closed_form(rows):
    for f in rows:
        diff = f["s_real"] - f["s_fake"]                                         # [81, 2]
        np.testing.assert_allclose(diff, np.tile([magnitude_of_difference(f["sigma"]), 0.0], (81, 1)), atol=1e-4)
        direction = f["update"] / np.linalg.norm(f["update"], axis=1, keepdims=True)
        np.testing.assert_allclose(direction, np.tile([1.0, 0.0], (30, 1)), atol=1e-5)   # -grad: from fake to real


def test_dmd_fields_leave_the_random_stream_alone(rows):
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    real, fake = GaussianMixtureDenoiser([A], S), GaussianMixtureDenoiser([B], S)
    again = viz.dmd_fields(real, fake, torch.zeros(5, 2), 1.0, n=5, num_noise=2)
    torch.testing.assert_close(torch.rand(3), expected)
    np.testing.assert_array_equal(again["update"], viz.dmd_fields(real, fake, torch.zeros(5, 2), 1.0, n=5,
                                                                  num_noise=2)["update"])


def test_score_rows(rows):
    fig = viz.score_rows(rows, torch.tensor([A]), captions=["first row says", "second row says"])
    body = fig.subfigs[1]
    assert len(body.subfigs) == len(SIGMAS)
    scales = []
    for subfig, f, caption in zip(body.subfigs, rows, ["first row says", "second row says"]):
        axes = subfig.axes
        assert len(axes) == 4                                                    # real, fake, difference, colour bar
        levels = [tuple(bands(ax).levels) for ax in axes[:3]]
        assert len(set(levels)) == 1                                             # one colour scale in the row
        scales.append(levels[0][-1])
        assert scales[-1] >= magnitude_of_difference(f["sigma"])                 # the difference is not off the scale
        quiver = axes[2].collections[-2]                                         # the update arrows, then the dots
        assert isinstance(quiver, matplotlib.quiver.Quiver)
        np.testing.assert_allclose(quiver.get_offsets(), f["x"])                 # one arrow at each sample
        drawn = np.stack([quiver.U, quiver.V], 1)
        unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)           # noqa: E731
        np.testing.assert_allclose(unit(drawn), unit(f["update"]), atol=1e-5)    # each arrow along its update
        assert np.abs(f["x"] + drawn).max() <= axes[2].get_xlim()[1] + 1e-6      # and its tip inside the panel
        assert quiver.U.min() > 0 and np.allclose(quiver.V, 0, atol=1e-5)       # pointing from the fake to the real
        assert caption in [t.get_text() for t in subfig.texts]
    assert scales[0] != scales[1]                                                # the scale belongs to the row
    plt.close(fig)


def test_training_strip(rows):
    snapshots = [dict(step=step, fields=f) for step, f in zip((0, 10), rows)]
    fig = viz.training_strip(snapshots, torch.tensor([A]))
    top, bottom = fig.subfigs[1].subfigs
    for subfig in (top, bottom):
        assert len(subfig.axes) == len(snapshots) + 1                          # a panel per step, a colour bar
        assert len({tuple(bands(ax).levels) for ax in subfig.axes[:-1]}) == 1     # one colour scale across the steps
    quivers = [ax.collections[-2] for ax in bottom.axes[:-1]]
    scales = [np.max(np.hypot(q.U, q.V) / np.linalg.norm(f["update"], axis=1)) for q, f in zip(quivers, rows)]
    np.testing.assert_allclose(scales, scales[0], rtol=1e-5)                     # one arrow scale across the steps
    # (the longest arrows are cut, so the largest drawn / update ratio is the scale)
    assert [ax.get_title() for ax in top.axes[:-1]] == ["step 0: s_fake, sigma = 0.5", "step 10: s_fake, sigma = 2"]
    plt.close(fig)


def test_small_png_is_a_palette_png_and_closes_the_figure(rows):
    import io

    from PIL import Image

    fig = viz.score_rows(rows, torch.tensor([A]))
    shown = viz.small_png(fig, colors=64)
    assert not plt.fignum_exists(fig.number)
    image = Image.open(io.BytesIO(shown.data))
    assert image.format == "PNG" and image.mode == "P" and len(image.getcolors()) <= 64


@pytest.mark.parametrize("channels", [1, 3])
def test_dmd_image_rows_draws_the_terms(channels):
    """Real images N(+0.5, s^2 I), the generator's N(-0.5, s^2 I): mu_fake - mu_real = -sigma^2 / (s^2 + sigma^2)
    in every pixel, so grad < 0 everywhere and the drawn update -grad > 0 (red: x - grad brightens it), on a scale
    symmetric about 0."""
    from dmd_minimal.dmd_loss import dmd_terms

    shape, sigma = (channels, 4, 4), torch.tensor([0.5, 2.0, 10.0])
    real = GaussianMixtureDenoiser(torch.full((1, *shape), 0.5), S)
    fake = GaussianMixtureDenoiser(torch.full((1, *shape), -0.5), S)
    x = -0.5 + S * torch.randn(1, *shape)
    terms = dmd_terms(x.expand(3, -1, -1, -1), sigma, real, fake)
    mean_grad = torch.stack([dmd_terms(x.expand(8, -1, -1, -1), s.expand(8), real, fake)["grad"].mean(0)
                             for s in sigma])                                    # [3, C, 4, 4]
    fig = viz.dmd_image_rows(x[0], sigma, terms, mean_grad)
    axes = np.array(fig.axes).reshape(3, 8)          # x, x_t, mu_real, mu_fake, -grad, colour bar, its mean, colour bar
    assert axes[0, 0].get_title() == "x = G(z)" and not axes[1, 0].axison
    assert [ax.get_title() for ax in axes[:, 1]] == ["x_t, sigma = 0.5", "x_t, sigma = 2", "x_t, sigma = 10"]
    for column, grad in ((4, terms["grad"]), (6, mean_grad)):
        limits = {ax.get_images()[0].get_clim() for ax in axes[:, column]}
        assert len(limits) == 1                                                  # one scale for the rows
        (lo, hi), = limits
        assert lo == -hi and hi >= grad.mean(1).abs().max()                      # symmetric, nothing off the scale
        for row, ax in enumerate(axes[:, column]):
            drawn = ax.get_images()[0].get_array()
            np.testing.assert_allclose(drawn, -grad[row].mean(0).numpy(), rtol=1e-6)   # the channels' mean
            assert drawn.min() > 0
    plt.close(fig)


def test_step_curves_draws_every_reference_line():
    from dmd_minimal.plots import REFERENCE_STYLES, step_curves
    references = {f"teacher {k}": 10.0 + k for k in range(len(REFERENCE_STYLES) + 2)}   # more than the styles
    fig = step_curves({"DMD": ([0, 1], [30.0, 12.0])}, references)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["DMD", *references]
    assert [line.get_ydata()[0] for line in lines[1:]] == list(references.values())
    plt.close(fig)


def test_density_ratio_draws_the_log_ratio_and_arrows_up_it():
    """1D: p_real = N(2, s^2) and p_fake = N(-2, s^2), so log(p_real,sigma / p_fake,sigma) = 4 x / (s^2 + sigma^2),
    a line, and every arrow s_real - s_fake points to +x."""
    real, fake = GaussianMixtureDenoiser([[2.0]], S), GaussianMixtureDenoiser([[-2.0]], S)
    x = fake.sample(20, torch.Generator().manual_seed(0))                      # [20, 1]
    fig, axes = plt.subplots(2, 1)
    viz.density_ratio(axes, real, fake, x, 1.0)
    u, ratio = axes[1].get_lines()[0].get_data()
    np.testing.assert_allclose(ratio, 4 * u / (S**2 + 1.0), rtol=1e-4, atol=1e-4)
    (quiver,) = [c for c in axes[1].collections if isinstance(c, matplotlib.quiver.Quiver)]
    np.testing.assert_allclose(quiver.get_offsets()[:, 0], x[:, 0].numpy())
    assert quiver.U.min() > 0 and np.allclose(quiver.V, 0)
    plt.close(fig)
