"""Training a teacher with EDM's loss, for data without a released teacher (EDM §5).

The weights kept are an exponential moving average of the trained ones, as in EDM.
"""
import copy
import math

import torch
from tqdm import tqdm

from .denoiser import edm_loss


@torch.no_grad()
def ema_update(ema, net, decay):
    """ema <- decay ema + (1 - decay) net, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def train_teacher(denoiser, next_batch, steps, lr, ema_decay=0.999, P_mean=-1.2, P_std=1.2):
    """Train `denoiser` on batches (x, class_labels) from next_batch(); returns the EMA copy and the loss curve."""
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    bar = tqdm(range(steps), desc="teacher", mininterval=1.0)
    for step in bar:
        x, class_labels = next_batch()
        loss = edm_loss(denoiser, x, class_labels, P_mean, P_std)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema_update(ema, denoiser, ema_decay)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    return ema, losses
