"""DhariwalUNet: the ADM image network, as EDM configures it for ImageNet 64x64.

Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", arXiv 2105.05233 (§3);
EDM (Karras et al., arXiv 2206.00364) retrains it with its preconditioning, and DMD
(arXiv 2311.18828, §5) distils EDM's ImageNet-64 ADM network. Compared with DDPM++ (songunet.py):
the embedding scales and shifts each block's normalised activations (adaptive GroupNorm), attention
has C // 64 heads at several resolutions, and the class enters after the noise MLP, without bias.
Module names and tensor shapes are EDM's, so an EDM DhariwalUNet state_dict loads with strict=True.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet_layers import BlockStyle, Conv, Init, ResidualBlock, SinusoidalEmbedding, group_norm, linear


class DhariwalUNet(nn.Module):
    """ADM: F(x_in, c_noise, class_labels, augment_labels) -> F_x, same shape as x_in."""

    def __init__(self,
                 img_resolution=64,            # H = W of the input and output
                 in_channels=3,                # channels of x_in
                 out_channels=3,               # channels of F_x
                 label_dim=0,                  # classes; 0: unconditional
                 augment_dim=0,                # size of EDM's augmentation labels; 0: none
                 model_channels=192,           # base width
                 channel_mult=(1, 2, 3, 4),    # width per resolution, in units of model_channels
                 channel_mult_emb=4,           # embedding width, in units of model_channels
                 num_blocks=3,                 # residual blocks per resolution (the decoder has one more)
                 attn_resolutions=(32, 16, 8), # resolutions whose blocks attend
                 dropout=0.10,                 # inside every block; DMD uses 0
                 label_dropout=0.0):           # drop the class while training (classifier-free guidance)
        super().__init__()
        self.config = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                           label_dim=label_dim, augment_dim=augment_dim, model_channels=model_channels,
                           channel_mult=list(channel_mult), channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout, label_dropout=label_dropout)
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))   # PyTorch's default init
        init_zero = Init("kaiming_uniform", weight=0, bias=0)
        style = BlockStyle(emb_channels=emb_channels,
                           channels_per_head=64,
                           dropout=dropout,
                           skip_scale=1.0,
                           eps=1e-5,
                           resample_filter=(1, 1),
                           resample_proj=False,
                           adaptive_scale=True,                       # scale and shift from the embedding
                           init=init, init_zero=init_zero)

        # Embedding: noise level (+ augmentation) -> MLP, + class -> emb [B, emb_channels]
        self.map_noise = SinusoidalEmbedding(model_channels, endpoint=False)
        self.map_augment = linear(augment_dim, model_channels, init_zero, bias=False) if augment_dim else None
        self.map_layer0 = linear(model_channels, emb_channels, init)
        self.map_layer1 = linear(emb_channels, emb_channels, init)
        self.map_label = (linear(label_dim, emb_channels, Init("kaiming_normal", weight=math.sqrt(label_dim)), bias=False)
                          if label_dim else None)

        # Encoder: entries named "{res}x{res}_{role}"; every entry's output is a skip
        self.enc = nn.ModuleDict()
        c = model_channels * channel_mult[0]
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv(in_channels, c, 3, init)
            else:
                self.enc[f"{res}x{res}_down"] = ResidualBlock(c, c, style, resample="down")
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = ResidualBlock(c, model_channels * mult, style,
                                                                  attention=res in attn_resolutions)
                c = model_channels * mult
        skips = [layer.out_channels for layer in self.enc.values()]

        # Decoder: each "_block" entry first concatenates the latest unused encoder activation
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = ResidualBlock(c, c, style, attention=True)
                self.dec[f"{res}x{res}_in1"] = ResidualBlock(c, c, style)
            else:
                self.dec[f"{res}x{res}_up"] = ResidualBlock(c, c, style, resample="up")
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = ResidualBlock(c + skips.pop(), model_channels * mult, style,
                                                                  attention=res in attn_resolutions)
                c = model_channels * mult
        self.out_norm = group_norm(c)
        self.out_conv = Conv(c, out_channels, 3, init_zero)

    def embed(self, noise_labels, class_labels, augment_labels):
        """The embedding emb [B, emb_channels] that scales and shifts every block."""
        emb = self.map_noise(noise_labels)                               # [B, model_channels]: cos first
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))             # [B, emb_channels]
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, ResidualBlock) else layer(x)   # [B, C, res, res]
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)                   # [B, C + C_skip, res, res]
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))                  # [B, out_channels, H, W]
