"""DMD's loop one piece at a time, each against an oracle: which network sees which sigma and labels,
the generator's gradient (autograd, with and without class labels), the fake score's extra steps, the clipped
norm, the warm-up, the EMA (closed form)."""
import torch

from dmd_minimal.config import make_config
from dmd_minimal.dmd_loss import distribution_matching_loss, dmd_gradient, draw_sigmas, regression_loss, sigma_levels
from dmd_minimal.networks import build_denoiser
from dmd_minimal.teacher import ema_update
from dmd_minimal.train import build_dmd, dmd_iteration, generator_step, lr_factor, resolve

LABEL_DIM = 3


def tiny_dmd(tmp_path, label_dim=LABEL_DIM, **overrides):
    """The networks and optimisers of a toy2d DMD run around an untrained small MLP teacher, the fake score
    jittered away from it (as after some training: else the DM gradient would be 0)."""
    cfg = resolve(make_config("toy2d", out=str(tmp_path), device="cpu", sigma_data=1.0, **overrides))
    torch.manual_seed(0)
    teacher = build_denoiser("mlp", 1.0, label_dim, hidden=16, depth=2).requires_grad_(False).eval()
    nets, training = build_dmd(cfg, teacher)
    with torch.no_grad():
        for p in nets["fake_score"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    return cfg, nets, training, sigma_levels(cfg.num_levels, cfg.sigma_min, cfg.sigma_max, cfg.rho)


def test_one_iteration_gives_each_network_its_sigmas_and_labels(tmp_path):
    cfg, nets, training, levels = tiny_dmd(tmp_path, batch_size=1024, lambda_reg=0.0, ema=0.9)
    calls = []   # (network, sigma [B], class labels [B], whether autograd records)
    for name in ("teacher", "fake_score"):
        nets[name].register_forward_pre_hook(
            lambda net, args, name=name: calls.append((name, args[1], args[2], torch.is_grad_enabled())))
    nets["generator"].register_forward_pre_hook(lambda net, args: calls.append(("generator", None, args[1], True)))
    generator_before = [p.clone() for p in nets["generator"].parameters()]
    dmd_iteration(cfg, nets, training, None, levels, dict(generator=0, fake_score=0))

    assert [(name, grad) for name, _, _, grad in calls] == [
        ("generator", True), ("teacher", False), ("fake_score", False), ("fake_score", True)]
    labels = calls[0][2]
    assert labels.shape == (1024,) and set(labels.tolist()) == set(range(LABEL_DIM))
    for name, _, class_labels, _ in calls:   # the real score, the fake score and its training see x's labels
        assert torch.equal(class_labels, labels), name
    index = lambda sigma: torch.searchsorted(levels, sigma)   # noqa: E731   grid index of each sigma
    assert torch.equal(levels[index(calls[1][1])], calls[1][1])   # sigmas of the grid
    for dm_sigma in (calls[1][1], calls[2][1]):   # distribution matching: indices 20..980 (2%-98%), up to the ends
        assert 20 <= index(dm_sigma).min() <= 30 and 970 <= index(dm_sigma).max() <= 980
    assert index(calls[3][1]).min() < 20 and index(calls[3][1]).max() > 980   # the fake score: the whole grid
    for p_ema, p_before, p_after in zip(nets["generator_ema"].parameters(), generator_before,
                                        nets["generator"].parameters()):   # EMA 0.9 of the weights, after the step
        torch.testing.assert_close(p_ema, 0.9 * p_before + 0.1 * p_after)


def test_draw_sigmas_draws_both_ends_of_its_range():
    levels = sigma_levels(5)
    assert set(draw_sigmas(levels, 1000).tolist()) == set(levels.tolist())
    assert set(draw_sigmas(levels, 1000, 1, 3).tolist()) == set(levels[1:4].tolist())


def generator_gradient(cfg, nets, pair_batch, levels, seed):
    """The gradient generator_step leaves on the generator (lr 0: the step changes nothing), and its metrics."""
    optimizer = torch.optim.AdamW(nets["generator"].parameters(), lr=0.0)
    torch.manual_seed(seed)
    _, _, metrics = generator_step(cfg, nets, optimizer, pair_batch, levels)
    return [p.grad.clone() for p in nets["generator"].parameters()], metrics


def test_generator_gradient_is_the_dm_gradient_plus_lambda_times_the_regression_gradient(tmp_path):
    cfg, nets, _, levels = tiny_dmd(tmp_path, label_dim=0, batch_size=64, lambda_reg=0.25, grad_clip=1e9)
    pair_batch = dict(z=torch.randn(64, 2), y=torch.randn(64, 2), labels=None)
    gradient, metrics = generator_gradient(cfg, nets, pair_batch, levels, seed=1)

    generator, params = nets["generator"], list(nets["generator"].parameters())
    torch.manual_seed(1)   # the same draws as generator_step: z, then sigma, then the noise of x_t
    x = generator(torch.randn(64, 2))
    sigma = draw_sigmas(levels, 64, cfg.dm_min_level, cfg.dm_max_level)
    grad = dmd_gradient(x, sigma, nets["teacher"], nets["fake_score"])
    grad_dm = torch.autograd.grad(distribution_matching_loss(x, grad), params)
    grad_reg = torch.autograd.grad(regression_loss(generator(pair_batch["z"]), pair_batch["y"]), params)
    for g, g_dm, g_reg in zip(gradient, grad_dm, grad_reg):
        torch.testing.assert_close(g, g_dm + 0.25 * g_reg)
    ratio = torch.cat([g.flatten() for g in grad_reg]).norm() / torch.cat([g.flatten() for g in grad_dm]).norm()
    assert 0.1 < ratio < 10   # both parts matter (0.46 here)
    norm = torch.cat([(g_dm + 0.25 * g_reg).flatten() for g_dm, g_reg in zip(grad_dm, grad_reg)]).norm()
    torch.testing.assert_close(metrics["grad_norm"], norm.item())


def test_the_generators_gradient_is_clipped_to_grad_clip(tmp_path):
    cfg, nets, _, levels = tiny_dmd(tmp_path, label_dim=0, batch_size=64, lambda_reg=0.0, grad_clip=1e-4)
    gradient, metrics = generator_gradient(cfg, nets, None, levels, seed=1)
    assert metrics["grad_norm"] > 1e-3   # the norm before clipping, as logged
    torch.testing.assert_close(torch.cat([g.flatten() for g in gradient]).norm().item(), 1e-4)


def test_warm_up_starts_above_zero_and_reaches_the_full_rate_after_warmup_steps(tmp_path):
    factor = lr_factor(make_config("toy2d", warmup_steps=4, dmd_steps=100, cosine_decay=False))
    assert [factor(step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    _, _, training, _ = tiny_dmd(tmp_path, warmup_steps=4, lr=1e-2, cosine_decay=False)
    assert training["optimizers"]["generator"].param_groups[0]["lr"] == 0.25 * 1e-2   # the first step's rate


def test_ema_update_against_the_closed_form():
    ema, net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start, targets = [p.clone() for p in ema.parameters()], []
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.normal_()
        targets.append([p.clone() for p in net.parameters()])
        ema_update(ema, net, 0.9)
    for i, p in enumerate(ema.parameters()):   # 0.9^3 start + sum_k 0.1 * 0.9^(2-k) target_k
        expected = 0.9**3 * start[i] + sum(0.1 * 0.9 ** (2 - k) * targets[k][i] for k in range(3))
        torch.testing.assert_close(p, expected)


def test_extra_fake_score_steps_train_on_fresh_samples_and_labels(tmp_path):
    """--fake-steps-per-generator-step 3 (DMD2's rule with 5): the fake score takes 3 steps per generator step,
    the 2nd and 3rd on fresh generator samples with fresh labels, each step on the samples of its own labels."""
    cfg, nets, training, levels = tiny_dmd(tmp_path, batch_size=64, lambda_reg=0.0, fake_steps_per_generator_step=3)
    made, trained = [], []   # the generator's (x, labels); the fake score's training inputs (x_t, sigma, labels)
    nets["generator"].register_forward_hook(lambda net, args, x: made.append((x.detach(), args[1])))
    nets["fake_score"].register_forward_pre_hook(lambda net, args: trained.append(args) if torch.is_grad_enabled()
                                                 else None)
    dmd_iteration(cfg, nets, training, None, levels, dict(generator=0, fake_score=0))

    assert len(made) == len(trained) == 3
    near = lambda x_t, x, sigma: (x_t - x).norm(dim=1) < 6 * sigma   # noqa: E731   x_t = x + sigma n, n in 2D
    for k, ((x, labels), (x_t, sigma, fake_labels)) in enumerate(zip(made, trained)):
        small = sigma < 0.05   # where x_t pins down the x it was made from
        assert torch.equal(fake_labels, labels) and small.sum() >= 4 and near(x_t, x, sigma)[small].all(), k
        if k > 0:   # fresh samples and labels: not the first step's
            assert not torch.equal(labels, made[0][1]) and not near(x_t, made[0][0], sigma)[small].all(), k
    step_count = lambda name: training["optimizers"][name].state[next(nets[name].parameters())]["step"]  # noqa: E731
    assert step_count("fake_score") == 3 and step_count("generator") == 1


def test_regression_pairs_reach_the_generator_with_their_labels(tmp_path):
    """The regression loss compares G(z_pair, label_pair) with y (DMD Eq. 9, a class-conditional teacher's pairs)."""
    cfg, nets, _, levels = tiny_dmd(tmp_path, batch_size=64, lambda_reg=1.0, distribution_matching=False,
                                    grad_clip=1e9)
    pair_batch = dict(z=torch.randn(64, 2), y=torch.randn(64, 2), labels=torch.arange(64) % LABEL_DIM)
    gradient, metrics = generator_gradient(cfg, nets, pair_batch, levels, seed=1)

    generator, params = nets["generator"], list(nets["generator"].parameters())
    loss = regression_loss(generator(pair_batch["z"], pair_batch["labels"]), pair_batch["y"])
    for g, expected in zip(gradient, torch.autograd.grad(loss, params)):
        torch.testing.assert_close(g, expected)
    torch.testing.assert_close(metrics["loss_reg"], loss.item())
    unlabelled = regression_loss(generator(pair_batch["z"]), pair_batch["y"])
    assert abs(unlabelled.item() - loss.item()) > 1e-3   # the labels matter
