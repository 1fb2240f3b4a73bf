"""The building blocks shared by EDM's two image UNets (DDPM++/NCSN++ and ADM).

Karras et al., arXiv 2206.00364, Appendix F.2 describes both networks; Song et al. (arXiv 2011.13456)
and Dhariwal & Nichol (arXiv 2105.05233) introduced them. One residual block covers both: a GroupNorm -
SiLU - conv pair that the noise embedding modulates (by addition, or by a scale and shift in ADM),
optional 2x FIR up/down-sampling, and optional multi-head self-attention. Parameter names and the
shapes of every tensor follow EDM's released networks, so their weights load unchanged.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .denoiser import append_dims


# ---- initialisation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Init:
    """How a layer's weights start: a fan-based distribution, scaled by `weight`; the bias by `bias`."""
    mode: str = "kaiming_normal"   # xavier_uniform | xavier_normal | kaiming_uniform | kaiming_normal
    weight: float = 1.0            # multiplies the weight draw (0 or 1e-5: a layer that starts silent)
    bias: float = 0.0              # multiplies a draw of the same distribution for the bias


def fan_scaled_randn(shape, mode, fan_in, fan_out):
    """A draw with the variance Glorot (xavier_*) or He (kaiming_*) prescribe for these fans."""
    uniform = mode.endswith("_uniform")
    noise = torch.rand(*shape) * 2 - 1 if uniform else torch.randn(*shape)     # U(-1, 1) or N(0, 1)
    variance = {"xavier": 2 / (fan_in + fan_out), "kaiming": 1 / fan_in}[mode.split("_")[0]]
    return noise * math.sqrt(3 * variance if uniform else variance)           # U(-a, a) has variance a^2 / 3


def linear(c_in, c_out, init, bias=True):
    """nn.Linear whose weight and bias start as `init` prescribes."""
    layer = nn.Linear(c_in, c_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(fan_scaled_randn([c_out, c_in], init.mode, c_in, c_out) * init.weight)
        if bias:
            layer.bias.copy_(fan_scaled_randn([c_out], init.mode, c_in, c_out) * init.bias)
    return layer


def group_norm(channels, eps=1e-5):
    """GroupNorm with 32 groups, fewer when a group would hold under 4 channels."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


# ---- convolution with FIR resampling ---------------------------------------------------------------

def upsample_2x(x, fir):
    """Each channel upsampled 2x by a transposed convolution with the FIR kernel fir [1, 1, k, k]."""
    C, pad = x.shape[1], (fir.shape[-1] - 1) // 2
    return F.conv_transpose2d(x, (4 * fir).tile([C, 1, 1, 1]), groups=C, stride=2, padding=pad)  # [B, C, 2H, 2W]


def downsample_2x(x, fir, pad=None):
    """Each channel blurred by the FIR kernel fir [1, 1, k, k] and subsampled 2x."""
    C = x.shape[1]
    pad = (fir.shape[-1] - 1) // 2 if pad is None else pad
    return F.conv2d(x, fir.tile([C, 1, 1, 1]), groups=C, stride=2, padding=pad)                 # [B, C, H/2, W/2]


class Conv(nn.Module):
    """A kernel x kernel convolution, optionally after a 2x FIR resampling; kernel = 0: the resampling alone.

    resample is None, "up", "down" or "fused_down" (NCSN++'s residual encoder path: convolve at full
    resolution, with the padding both steps would have used, then downsample).
    The FIR kernel is the outer product of `resample_filter` with itself, normalised to sum 1
    ([1, 1]: box filter, i.e. nearest / average pooling; [1, 3, 3, 1]: the smoother binomial one).
    """

    def __init__(self, c_in, c_out, kernel, init=Init(), resample=None, resample_filter=(1, 1)):
        super().__init__()
        if resample not in (None, "up", "down", "fused_down"):
            raise ValueError(f"resample must be None, 'up', 'down' or 'fused_down', not {resample!r}")
        self.in_channels, self.out_channels, self.resample = c_in, c_out, resample
        fans = dict(mode=init.mode, fan_in=c_in * kernel**2, fan_out=c_out * kernel**2)
        shape = [c_out, c_in, kernel, kernel]
        self.weight = nn.Parameter(fan_scaled_randn(shape, **fans) * init.weight) if kernel else None
        self.bias = nn.Parameter(fan_scaled_randn([c_out], **fans) * init.bias) if kernel else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        fir = torch.outer(taps, taps)[None, None] / taps.sum() ** 2                # [1, 1, k, k]
        self.register_buffer("resample_filter", fir if resample else None)

    def forward(self, x):
        fir = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w = self.weight.to(x.dtype) if self.weight is not None else None   # as EDM: the activations' dtype
        w_pad = w.shape[-1] // 2 if w is not None else 0
        if self.resample == "fused_down":
            f_pad = (fir.shape[-1] - 1) // 2
            x = F.conv2d(x, w, padding=w_pad + f_pad)                              # [B, C_out, H + 2 f_pad, ...]
            x = downsample_2x(x, fir, pad=0)                                       # [B, C_out, H/2, W/2]
        else:
            if self.resample == "up":
                x = upsample_2x(x, fir)
            if self.resample == "down":
                x = downsample_2x(x, fir)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)                                  # [B, C_out, H, W]
        if self.bias is not None:   # in the convolution's dtype: bf16 stays bf16 from layer to layer
            x = x + append_dims(self.bias.to(x.dtype), 3)                          # bias [C_out, 1, 1]
        return x


# ---- the residual block ----------------------------------------------------------------------------

def attention_weights(q, k):
    """softmax_j(q_i . k_j / sqrt(c)) [N, HW, HW] from q, k [N, c, HW], in fp32 with autocast off.

    EDM's AttentionOp casts q and k to fp32; inside torch.autocast a cast alone does nothing (einsum
    runs in bf16 or fp16 again), so autocast is switched off for the logits and the softmax.
    """
    with torch.autocast(q.device.type, enabled=False):
        logits = torch.einsum("nci,ncj->nij", q.float(), k.float() / math.sqrt(q.shape[1]))   # [N, HW, HW]
        return logits.softmax(dim=2)


@dataclass(frozen=True)
class BlockStyle:
    """What every residual block of one network shares (DDPM++ and ADM differ in each row)."""
    emb_channels: int                   # width of the noise (+ class) embedding that modulates the block
    channels_per_head: int = 0          # attention heads = C // channels_per_head; 0: a single head
    dropout: float = 0.0                # before the second conv; DMD runs with 0
    skip_scale: float = 1.0             # sqrt(1/2) in DDPM++ keeps the residual sum at unit variance
    eps: float = 1e-5                   # GroupNorm epsilon
    resample_filter: tuple = (1, 1)     # FIR taps of the up/down blocks
    resample_proj: bool = False         # a learned 1x1 conv on the skip path of up/down blocks
    adaptive_scale: bool = True         # ADM: the embedding gives a scale and a shift after the norm
    init: Init = Init()                 # conv0, affine, skip
    init_zero: Init = Init(weight=0)    # conv1 and the attention output: the block starts near identity
    init_attn: Init = None              # qkv (None: same as init)


class ResidualBlock(nn.Module):
    """h = conv0(SiLU(norm0 x)), modulated by emb inside SiLU(norm1 .); x = skip_scale (skip(x) + conv1(dropout h)).

    Then, where the block attends, x = skip_scale (x + proj(attention(norm2 x))).
    """

    def __init__(self, c_in, c_out, style, resample=None, attention=False):
        super().__init__()
        self.in_channels, self.out_channels = c_in, c_out
        self.dropout, self.skip_scale, self.adaptive_scale = style.dropout, style.skip_scale, style.adaptive_scale
        heads = 1 if style.channels_per_head == 0 else c_out // style.channels_per_head
        self.num_heads = heads if attention else 0          # ADM at C < 64 has no head, hence no attention
        resampling = dict(resample=resample, resample_filter=style.resample_filter)   # resample: None | up | down

        self.norm0 = group_norm(c_in, style.eps)
        self.conv0 = Conv(c_in, c_out, 3, style.init, **resampling)
        self.affine = linear(style.emb_channels, c_out * (2 if style.adaptive_scale else 1), style.init)
        self.norm1 = group_norm(c_out, style.eps)
        self.conv1 = Conv(c_out, c_out, 3, style.init_zero)
        self.skip = None
        if c_out != c_in or resample:
            kernel = 1 if style.resample_proj or c_out != c_in else 0
            self.skip = Conv(c_in, c_out, kernel, style.init, **resampling)
        if self.num_heads:
            self.norm2 = group_norm(c_out, style.eps)
            self.qkv = Conv(c_out, 3 * c_out, 1, style.init_attn or style.init)
            self.proj = Conv(c_out, c_out, 1, style.init_zero)

    def attention(self, x):
        """Multi-head self-attention over the H*W positions; qkv's channels are [heads, C/heads, 3]."""
        B, C, H, W = x.shape
        c = C // self.num_heads
        q, k, v = self.qkv(x).reshape(B * self.num_heads, c, 3, H * W).unbind(2)       # each [B heads, c, HW]
        weights = attention_weights(q, k)                                              # [B heads, HW, HW]
        out = torch.einsum("nij,ncj->nci", weights.to(v.dtype), v)                     # [B heads, c, HW]
        return out.reshape(B, C, H, W)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))                            # [B, C_out, H', W']
        params = append_dims(self.affine(emb), h.ndim).to(h.dtype)       # [B, C_out or 2 C_out, 1, 1]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self.attention(self.norm2(x))) + x) * self.skip_scale
        return x


# ---- noise-level embeddings ------------------------------------------------------------------------

class SinusoidalEmbedding(nn.Module):
    """[cos(c_noise f_i), sin(c_noise f_i)] with f_i = (1/10000)^(i/n), i = 0..half-1 (Transformer style).

    endpoint=True (DDPM++) sets n = half - 1 so the last frequency reaches 1/10000; ADM uses n = half.
    """

    def __init__(self, num_channels, endpoint=False, max_positions=10000):
        super().__init__()
        self.num_channels, self.endpoint, self.max_positions = num_channels, endpoint, max_positions

    def forward(self, c_noise):
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** exponents                              # [half]
        angles = c_noise[:, None] * freqs.to(c_noise.dtype)                        # [B, half]
        return torch.cat([angles.cos(), angles.sin()], dim=1)                      # [B, num_channels]


class FourierEmbedding(nn.Module):
    """[cos(2 pi c_noise f_i), sin(2 pi c_noise f_i)] with fixed random f_i ~ N(0, 16^2)  (NCSN++)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)      # [half]

    def forward(self, c_noise):
        angles = c_noise[:, None] * (2 * math.pi * self.freqs).to(c_noise.dtype)   # [B, half]
        return torch.cat([angles.cos(), angles.sin()], dim=1)                      # [B, num_channels]
