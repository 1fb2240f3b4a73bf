"""A small MLP backbone F(x_in, c_noise, class) for 2D toy data.

The noise level enters through sin/cos features of c_noise and a small MLP whose output is added
to every hidden layer, the way image UNets add their noise embedding to every block.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, dim=2, hidden=128, depth=4, emb_dim=64, label_dim=0):
        super().__init__()
        self.config = dict(dim=dim, hidden=hidden, depth=depth, emb_dim=emb_dim, label_dim=label_dim)
        # c_noise = ln(sigma) / 4 spans about [-1.6, 1.1]: frequencies 1..30 resolve it finely enough
        freqs = torch.exp(torch.linspace(0, math.log(30), emb_dim // 2))
        self.register_buffer("freqs", freqs)                         # [emb_dim / 2]
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_embed = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, noise_labels, class_labels=None):
        angles = noise_labels[:, None] * self.freqs                  # [B, emb_dim / 2]
        emb = self.noise_mlp(torch.cat([angles.sin(), angles.cos()], dim=1))   # [B, hidden]
        if self.label_embed is not None and class_labels is not None:
            emb = emb + self.label_embed(class_labels)
        h = self.inp(x)
        for layer in self.layers:
            h = layer(F.silu(h + emb))
        return self.out(F.silu(h + emb))
