"""The sample CLI: image files in the evaluator's format, per-index noise, balanced labels, teacher sampling."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from dmd_minimal.generator import OneStepGenerator
from dmd_minimal.networks import build_denoiser, denoiser_to_dict
from dmd_minimal.sample import main, sample, to_uint8
from dmd_minimal.sampler import sample_ode
from dmd_minimal.utils import atomic_save, per_index_noise
from test_ddp import free_port

LABEL_DIM = 3


def tiny_unet(channels=3, seed=0):
    torch.manual_seed(seed)
    return build_denoiser("songunet", 0.5, LABEL_DIM, img_resolution=8, in_channels=channels,
                          out_channels=channels, model_channels=8, channel_mult=[1], num_blocks=1,
                          attn_resolutions=[], dropout=0.0).eval()


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint in train's format, with untrained tiny networks (distinct teacher and generator)."""
    nets = dict(teacher=tiny_unet(seed=0), generator=tiny_unet(seed=1), fake_score=tiny_unet(seed=2))
    path = tmp_path / "checkpoint.pt"
    atomic_save(dict(config=dict(sigma_max=80.0), step=0,
                     **{name: denoiser_to_dict(net) for name, net in nets.items()}), path)
    return path, nets


def expected_images(model, num):
    index = torch.arange(num)
    with torch.no_grad():
        return to_uint8(model(per_index_noise(index, (3, 8, 8), 0), index % LABEL_DIM)).numpy()


def test_generator_samples_round_trip_as_npz_grid_and_pngs(checkpoint, tmp_path):
    path, nets = checkpoint
    out, png_dir = tmp_path / "dmd.npz", tmp_path / "png"
    main(["--checkpoint", str(path), "--num", "10", "--batch-size", "4", "--out", str(out), "--png-dir", str(png_dir)])
    saved = np.load(out)
    assert saved["arr_0"].dtype == np.uint8 and saved["arr_0"].shape == (10, 8, 8, 3)
    np.testing.assert_array_equal(saved["labels"], np.arange(10) % LABEL_DIM)   # balanced classes
    generator = OneStepGenerator(nets["generator"], 80.0)
    np.testing.assert_array_equal(saved["arr_0"], expected_images(generator, 10))
    for i in (0, 9):
        np.testing.assert_array_equal(np.asarray(Image.open(png_dir / f"{i:06d}.png")), saved["arr_0"][i])
    grid = np.asarray(Image.open(out.with_suffix(".png")))
    assert grid.shape[2] == 3 and grid.shape[0] > 8


def test_gray_images_are_written_with_one_channel(tmp_path):
    """Nothing assumes RGB: a 1-channel generator's samples are arr_0 [N, H, W, 1] and gray PNGs."""
    nets = dict(teacher=tiny_unet(1, seed=0), generator=tiny_unet(1, seed=1), fake_score=tiny_unet(1, seed=2))
    path, out, png_dir = tmp_path / "checkpoint.pt", tmp_path / "gray.npz", tmp_path / "png"
    atomic_save(dict(config=dict(sigma_max=80.0), step=0, **{k: denoiser_to_dict(v) for k, v in nets.items()}), path)
    main(["--checkpoint", str(path), "--num", "5", "--out", str(out), "--png-dir", str(png_dir)])
    images = np.load(out)["arr_0"]
    index = torch.arange(5)
    with torch.no_grad():
        x = OneStepGenerator(nets["generator"], 80.0)(per_index_noise(index, (1, 8, 8), 0), index % LABEL_DIM)
    assert images.shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(images, to_uint8(x).numpy())
    with Image.open(png_dir / "000004.png") as png:
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), images[4, :, :, 0])


def test_the_generators_ema_is_sampled_where_there_is_one_unless_no_ema(checkpoint, tmp_path, capsys):
    path, nets = checkpoint
    ema = tiny_unet(seed=3)   # what train() returns and the grids show when --ema is on
    saved = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "checksum"}   # atomic_save adds it
    atomic_save(dict(saved, generator_ema=denoiser_to_dict(ema)), path)
    for flags, net, what in (([], ema, "generator (EMA of its weights)"), (["--no-ema"], nets["generator"], "generator to")):
        out = tmp_path / f"samples{len(flags)}.npz"
        main(["--checkpoint", str(path), "--num", "4", "--out", str(out), *flags])
        np.testing.assert_array_equal(np.load(out)["arr_0"], expected_images(OneStepGenerator(net, 80.0), 4))
        assert f"samples of the one-step {what}" in capsys.readouterr().out


def test_teacher_steps_sample_the_teachers_ode_from_the_same_noise(checkpoint, tmp_path):
    path, nets = checkpoint
    out = tmp_path / "teacher.npz"
    main(["--checkpoint", str(path), "--teacher-steps", "2", "--num", "5", "--out", str(out)])
    heun = lambda z, labels: sample_ode(nets["teacher"], z, 2, labels)   # noqa: E731
    np.testing.assert_array_equal(np.load(out)["arr_0"], expected_images(heun, 5))


def test_ranks_split_the_indices_and_batch_size_does_not_matter():
    generator = OneStepGenerator(tiny_unet(), 80.0)
    whole, labels, _ = sample(generator, 7, (3, 8, 8), LABEL_DIM, batch_size=7)
    parts = [sample(generator, 7, (3, 8, 8), LABEL_DIM, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    indices = torch.cat([p[2] for p in parts])
    assert sorted(indices.tolist()) == list(range(7))
    order = indices.argsort()
    torch.testing.assert_close(torch.cat([p[0] for p in parts])[order], whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([p[1] for p in parts])[order], labels)


def cli_process(rank, port, argv):
    """One process of `torchrun --nproc_per_node 2 -m dmd_minimal.sample ...` (gloo on the CPU)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    main(argv)


def test_two_processes_write_the_same_file_as_one(checkpoint, tmp_path):
    path, _ = checkpoint
    argv = lambda out: ["--checkpoint", str(path), "--num", "7", "--batch-size", "2", "--device", "cpu",  # noqa: E731
                        "--out", str(out)]
    main(argv(tmp_path / "one.npz"))
    mp.start_processes(cli_process, args=(free_port(), argv(tmp_path / "two.npz")), nprocs=2, start_method="fork")
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(two["labels"], one["labels"])
    assert np.abs(two["arr_0"].astype(int) - one["arr_0"]).max() <= 1   # gathered in index order (rounding aside)


def test_to_uint8_maps_the_unit_range_onto_bytes():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_bad_requests_are_one_line_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(path), "--out", str(tmp_path / "x.png")])
    assert "must end in .npz" in str(exit_info.value) and "\n" not in str(exit_info.value)
