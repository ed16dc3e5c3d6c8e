"""The SD2 U-Net (UNet2DCondition), in diffusers' module names.

epsilon or v = unet(z_t, t, context): a noisy latent (B, C, h, w), timesteps, and text
features (B, 77, 1024) -> a prediction of the same shape as the latent.

SD2 gotchas, written where they bite:
- head width is 64 (yaml `num_head_channels: 64`); diffusers' config field
  `attention_head_dim` ([5, 10, 20, 20]) actually holds the number of heads per level;
- proj_in/proj_out of each transformer are Linear (yaml `use_linear_in_transformer`), not 1x1 convs;
- cross-attention width 1024 (OpenCLIP ViT-H/14 text features);
- the 768-v model computes attention in float32 (`upcast_attention`); in fp16 it overflows otherwise.
"""
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.attention import attention
from model.vae import Downsample2D, ResnetBlock2D, Upsample2D, _read_json

CROSS_DOWN, DOWN, CROSS_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN)
    up_block_types: tuple = (UP, CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: int = 2
    heads: tuple = (5, 10, 20, 20)  # per level, so head width = channels / heads = 64; the mid block uses heads[-1]
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    upcast_attention: bool = False

    @classmethod
    def from_json(cls, path_or_dict):
        """Read a diffusers unet/config.json (a path or an already parsed dict)."""
        cfg = _read_json(path_or_dict)
        cross = cfg.get("cross_attention_dim", 1024)
        if cross == 768:
            raise ValueError("U-Net config: cross_attention_dim 768 means a Stable Diffusion 1.x checkpoint "
                             "(CLIP ViT-L/14 text features); DiGSeg needs Stable Diffusion 2.x (1024)")
        if cross == 2048 or cfg.get("addition_embed_type") is not None:
            raise ValueError("U-Net config: cross_attention_dim 2048 / addition_embed_type means an SDXL "
                             "checkpoint; DiGSeg needs Stable Diffusion 2.x")
        supported = {"use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
                     "downsample_padding": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
                     "center_input_sample": False, "only_cross_attention": False,
                     "dual_cross_attention": False, "transformer_layers_per_block": 1,
                     "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
                     "time_cond_proj_dim": None, "time_embedding_type": "positional",
                     "resnet_time_scale_shift": "default", "attention_type": "default",
                     "conv_in_kernel": 3, "conv_out_kernel": 3, "mid_block_scale_factor": 1,
                     "timestep_post_act": None, "cross_attention_norm": None, "resnet_skip_time_act": False,
                     "resnet_out_scale_factor": 1, "class_embeddings_concat": False}
        for key, value in supported.items():
            if cfg.get(key, value) not in (value, [value] * len(cfg.get("block_out_channels", ()))):
                raise ValueError(f"U-Net config: {key}={cfg[key]!r} is not supported (SD2 has {value!r})")
        levels = len(cfg.get("block_out_channels", cls.block_out_channels))
        # diffusers quirk: `attention_head_dim` is the number of heads unless `num_attention_heads` is given
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", cls.heads)
        kwargs = {k: v for k, v in cfg.items() if k in {f.name for f in fields(cls)}}
        kwargs["heads"] = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * levels
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_dict(self):
        """The diffusers config.json for this U-Net (UNet2DConditionModel.from_config reads it)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["attention_head_dim"] = d.pop("heads")  # diffusers' name for the number of heads
        return {"_class_name": "UNet2DConditionModel", **d, "use_linear_projection": True,
                "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1,
                "mid_block_type": "UNetMidBlock2DCrossAttn"}

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


PRESETS = {"sd2-base": UNetConfig(), "sd2-768-v": UNetConfig(sample_size=96, upcast_attention=True),
           # toy.py's world: two levels, cross-attention at the finer one; (32, 64) wide, not (64, 128):
           # at command 1's budget the narrower one trains more steps in the time (docs/results.md)
           "toy": UNetConfig(block_out_channels=(32, 64), layers_per_block=1,
                             down_block_types=(CROSS_DOWN, DOWN), up_block_types=(UP, CROSS_UP), heads=(1, 2),
                             cross_attention_dim=128, norm_num_groups=8)}


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos | sin] of t * exp(-ln(10^4) i / (dim/2)), i < dim/2
    (LDM `timestep_embedding`; diffusers flip_sin_to_cos=True, freq_shift=0). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Attention(nn.Module):
    """Multi-head attention of x over context (itself if None); q/k/v without bias.

    `maps`: None, or a list to which each call appends its attention probabilities averaged over
    the heads, (B, N, M) in float32 (cross_attention_maps sets it; the output is unchanged)."""

    def __init__(self, dim, heads, context_dim=None, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.maps = None

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k = self.to_q(x), self.to_k(context)
        if self.maps is not None:
            b, n, c = q.shape
            qh = q.float().view(b, n, self.heads, -1).transpose(1, 2)             # (B, h, N, d)
            kh = k.float().view(b, k.shape[1], self.heads, -1).transpose(1, 2)    # (B, h, M, d)
            self.maps.append((qh @ kh.transpose(-1, -2) / math.sqrt(c // self.heads)).softmax(-1).mean(1))
        out = attention(q, k, self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear to 2 * inner, split into (a, b), return a * gelu(b) (exact gelu)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        # the no-op dropout keeps diffusers' indices: ff.net.0.proj, ff.net.2
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim, heads, context_dim, upcast):
        super().__init__()
        self.use_text = True        # False: skip the cross-attention (DiGSeg's text_scales="paper")
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        if self.use_text:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, Linear proj_in, one transformer block over the H*W tokens, Linear proj_out, residual."""

    def __init__(self, channels, heads, context_dim, groups, upcast):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim, upcast)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, HW, C)
        y = self.transformer_blocks[0](y, context)
        y = self.proj_out(y).transpose(1, 2).reshape(b, c, h, w)  # (B, HW, C) -> (B, C, H, W)
        return x + y


class DownBlock(nn.Module):
    """`layers` x (resnet [+ transformer]), then an optional stride-2 downsampler. Returns the
    output and every intermediate state, which the up path takes as skip connections."""

    def __init__(self, in_channels, out_channels, cfg, heads, cross_attention, downsample):
        super().__init__()
        temb, groups = 4 * cfg.block_out_channels[0], cfg.norm_num_groups
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, cfg.norm_eps, temb)
            for i in range(cfg.layers_per_block)])
        if cross_attention:
            self.attentions = nn.ModuleList([
                Transformer2DModel(out_channels, heads, cfg.cross_attention_dim, groups, cfg.upcast_attention)
                for _ in range(cfg.layers_per_block)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels)])

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`layers + 1` x (concat a skip, resnet [+ transformer]), then an optional x2 upsampler."""

    def __init__(self, prev_channels, out_channels, skip_channels, cfg, heads, cross_attention, upsample):
        super().__init__()
        temb, groups, n = 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.layers_per_block + 1
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_channels if i == 0 else out_channels) + (skip_channels if i == n - 1 else out_channels),
                          out_channels, groups, cfg.norm_eps, temb)
            for i in range(n)])
        if cross_attention:
            self.attentions = nn.ModuleList([
                Transformer2DModel(out_channels, heads, cfg.cross_attention_dim, groups, cfg.upcast_attention)
                for _ in range(n)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def forward(self, x, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)  # the latest skip first
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class MidBlock(nn.Module):
    def __init__(self, channels, cfg):
        super().__init__()
        temb, groups = 4 * cfg.block_out_channels[0], cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, cfg.norm_eps, temb) for _ in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(channels, cfg.heads[-1], cfg.cross_attention_dim, groups, cfg.upcast_attention)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNet2DCondition(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = replace(config) if config is not None else UNetConfig()  # a copy: the model owns it
        self.gradient_checkpointing = False
        ch, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg, cfg.heads[i], kind == CROSS_DOWN, downsample=i < last)
            for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock(ch[-1], cfg)
        rch, rheads = ch[::-1], cfg.heads[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(rch[max(i - 1, 0)], rch[i], rch[min(i + 1, last)], cfg, rheads[i], kind == CROSS_UP,
                    upsample=i < last)
            for i, kind in enumerate(cfg.up_block_types)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample, timestep, context):
        """sample (B, C, h, w) with h, w multiples of 2^(levels-1); timestep a number, a 0-d
        tensor or (B,); context (B, N, cross_attention_dim) -> (B, out_channels, h, w)."""
        run = self._checkpointed if self.gradient_checkpointing and self.training else self._direct
        if torch.is_tensor(timestep):
            t = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        else:                   # a number: filled on the device, not copied there (no host sync)
            t = torch.full((sample.shape[0],), float(timestep), device=sample.device)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = run(block, x, temb, context)
            skips += block_skips
        x = run(self.mid_block, x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            x, skips = run(block, x, skips[-n:], temb, context), skips[:-n]
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    @staticmethod
    def _direct(block, *args):
        return block(*args)

    @staticmethod
    def _checkpointed(block, *args):
        """Keep only the block's inputs; recompute its activations in the backward pass."""
        return checkpoint(block, *args, use_reentrant=False)


@contextmanager
def cross_attention_maps(unet):
    """Record the U-Net's cross-attention to the text (Sec. 3.5: text-to-region binding) while the
    block runs: yields {module name: list of (N, h_l * w_l, 77) maps, one per call}, each the
    attention probabilities of every latent position over the prompt tokens, averaged over heads;
    h_l x w_l is the resolution of that U-Net level. Outputs are unchanged."""
    layers = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    for m in layers.values():
        m.maps = []
    try:
        yield {n: m.maps for n, m in layers.items()}
    finally:
        for m in layers.values():
            m.maps = None
