"""SongUNet: the DDPM++ and NCSN++ image networks, as EDM configures them for CIFAR-10.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations",
arXiv 2011.13456 (§4.4, Appendix H); EDM (Karras et al., arXiv 2206.00364) retrains them with its
preconditioning, and DMD (arXiv 2311.18828, §5) distils EDM's CIFAR-10 DDPM++ networks.
The raw network F(x_in, c_noise, class_labels, augment_labels) of EDM's denoiser: an encoder of
residual blocks at each resolution, a decoder that concatenates the encoder's activations (skips),
and a noise embedding that modulates every block. Module names and tensor shapes are EDM's, so an
EDM SongUNet state_dict loads with strict=True.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet_layers import BlockStyle, Conv, FourierEmbedding, Init, ResidualBlock, SinusoidalEmbedding, group_norm, linear


class SongUNet(nn.Module):
    """DDPM++ (embedding_type positional, encoder standard) or NCSN++ (fourier, residual) at any size."""

    def __init__(self,
                 img_resolution=32,            # H = W of the input and output
                 in_channels=3,                # channels of x_in
                 out_channels=3,               # channels of F_x
                 label_dim=0,                  # classes; 0: unconditional
                 augment_dim=0,                # size of EDM's augmentation labels (9 with --augment); 0: none
                 model_channels=128,           # base width
                 channel_mult=(1, 2, 2, 2),    # width per resolution, in units of model_channels
                 channel_mult_emb=4,           # embedding width, in units of model_channels
                 num_blocks=4,                 # residual blocks per resolution (the decoder has one more)
                 attn_resolutions=(16,),       # resolutions whose blocks attend
                 dropout=0.10,                 # inside every block; DMD uses 0
                 label_dropout=0.0,            # drop the class while training (classifier-free guidance)
                 embedding_type="positional",  # noise embedding: positional (DDPM++) | fourier (NCSN++)
                 channel_mult_noise=1,         # noise-embedding width, in units of model_channels (NCSN++: 2)
                 encoder_type="standard",      # standard | skip | residual (NCSN++: an extra image path)
                 decoder_type="standard",      # standard | skip (an output at every resolution, summed)
                 resample_filter=(1, 1)):      # FIR taps for up/down-sampling (NCSN++: 1, 3, 3, 1)
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', not {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual") or decoder_type not in ("standard", "skip"):
            raise ValueError(f"unknown encoder_type {encoder_type!r} or decoder_type {decoder_type!r}")
        super().__init__()
        self.config = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                           label_dim=label_dim, augment_dim=augment_dim, model_channels=model_channels,
                           channel_mult=list(channel_mult), channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout, label_dropout=label_dropout,
                           embedding_type=embedding_type, channel_mult_noise=channel_mult_noise,
                           encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=list(resample_filter))
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight=1e-5)
        style = BlockStyle(emb_channels=emb_channels,
                           channels_per_head=0,                       # one head
                           dropout=dropout,
                           skip_scale=math.sqrt(0.5),
                           eps=1e-6,
                           resample_filter=tuple(resample_filter),
                           resample_proj=True,
                           adaptive_scale=False,                      # the embedding is added
                           init=init, init_zero=init_zero,
                           init_attn=Init("xavier_uniform", weight=math.sqrt(0.2)))

        # Embedding: noise level (+ class + augmentation) -> emb [B, emb_channels]
        self.map_noise = (SinusoidalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = linear(label_dim, noise_channels, init) if label_dim else None
        self.map_augment = linear(augment_dim, noise_channels, init, bias=False) if augment_dim else None
        self.map_layer0 = linear(noise_channels, emb_channels, init)
        self.map_layer1 = linear(emb_channels, emb_channels, init)

        # Encoder: entries named "{res}x{res}_{role}"; "aux" entries carry the extra image path
        self.enc = nn.ModuleDict()
        c, c_aux = model_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv(in_channels, c, 3, init)
            else:
                self.enc[f"{res}x{res}_down"] = ResidualBlock(c, c, style, resample="down")
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv(c_aux, c_aux, 0, resample="down",
                                                             resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv(c_aux, c, 1, init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv(c_aux, c, 3, init, resample="fused_down",
                                                                 resample_filter=resample_filter)
                    c_aux = c
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = ResidualBlock(c, model_channels * mult, style,
                                                                  attention=res in attn_resolutions)
                c = model_channels * mult
        skips = [layer.out_channels for name, layer in self.enc.items() if "_aux_" not in name]

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
                                                                  attention=i == num_blocks and res in attn_resolutions)
                c = model_channels * mult
            if decoder_type == "skip" or level == 0:       # an output head: norm, SiLU, conv to image channels
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv(out_channels, out_channels, 0, resample="up",
                                                           resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = group_norm(c, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv(c, out_channels, 3, init_zero)

    def embed(self, noise_labels, class_labels, augment_labels):
        """The embedding emb [B, emb_channels] that modulates every block."""
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)                               # [B, noise_channels]: sin first here
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))   # unit-norm one-hot -> sqrt(K)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))   # [B, emb_channels]

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips, aux = [], x                                               # aux: the encoder's image path
        for name, layer in self.enc.items():
            if name.endswith("_aux_down"):
                aux = layer(aux)                                         # [B, in_channels, res, res]
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + layer(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if isinstance(layer, ResidualBlock) else layer(x)   # [B, C, res, res]
                skips.append(x)
        out, head = None, None                                           # out: the image, summed over heads
        for name, layer in self.dec.items():
            if name.endswith("_aux_up"):
                out = layer(out)                                         # [B, out_channels, res, res]
            elif name.endswith("_aux_norm"):
                head = F.silu(layer(x))
            elif name.endswith("_aux_conv"):
                head = layer(head)                                       # [B, out_channels, res, res]
                out = head if out is None else head + out
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)               # [B, C + C_skip, res, res]
                x = layer(x, emb)
        return out
