"""AutoencoderKL: the SD2 VAE (Rombach et al. 2022, Sec. 3.1), in diffusers' module names.

The encoder maps an image x in [-1, 1] of shape (B, 3, H, W) to a diagonal Gaussian over
latents (B, 4, H/8, W/8); the decoder maps a latent back. SD2 trains its U-Net on
`mean * scaling_factor` (0.18215, the yaml's `scale_factor`): multiply after encoding,
divide before decoding. `encode`/`decode` here are unscaled, as in the entry points.

The resnet, down- and upsampling blocks are shared with the U-Net (model/unet.py).
"""
import json
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import attention


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)  # one level per entry; 2^(levels-1) downsampling
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512

    @classmethod
    def from_json(cls, path_or_dict):
        """Read a diffusers vae/config.json (a path or an already parsed dict)."""
        cfg = _read_json(path_or_dict)
        unsupported = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True,
                       "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None,
                       "latents_std": None}
        for key, supported in unsupported.items():
            if cfg.get(key, supported) != supported:
                raise ValueError(f"VAE config: {key}={cfg[key]!r} is not supported (SD2's VAE has "
                                 f"{key}={supported!r}); this is not a Stable Diffusion 2 VAE")
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(b != block for b in cfg.get(key, [block])):
                raise ValueError(f"VAE config: {key}={cfg[key]} is not supported; only {block} is")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)

    def to_dict(self):
        """The diffusers config.json for this VAE (AutoencoderKL.from_config reads it)."""
        levels = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **asdict(self),
                "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * levels,
                "up_block_types": ["UpDecoderBlock2D"] * levels,
                "act_fn": "silu", "mid_block_add_attention": True}

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


PRESETS = {"sd2-base": VAEConfig(), "sd2-768-v": VAEConfig(sample_size=768),
           # toy.py's world: 64 px scenes -> 16 x 16 x 4 latents; its scale is set after training (1 / std)
           "toy": VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=1.0)}


def _read_json(path_or_dict):
    if isinstance(path_or_dict, dict):
        return path_or_dict
    with open(path_or_dict) as f:
        return json.load(f)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1-projected) skip. The U-Net adds a projected time
    embedding between the two convs; the VAE has none (temb_channels=None)."""

    def __init__(self, in_channels, out_channels, groups, eps, temb_channels=None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The VAE pads asymmetrically, (left 0, right 1, top 0, bottom 1), then
    convolves without padding (LDM `Downsample`); the U-Net uses the usual padding 1."""

    def __init__(self, channels, asymmetric_padding=False):
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x):
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection (the VAE's
    mid block). diffusers names: group_norm, to_q, to_k, to_v, to_out.0."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        y = attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1)
        y = self.to_out[0](y).transpose(1, 2).reshape(b, c, h, w)  # (B, HW, C) -> (B, C, H, W)
        return x + y


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, 1e-6)
                                      for i in range(layers)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, asymmetric_padding=True)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class DecoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, 1e-6)
                                      for i in range(layers)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, groups, last = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, downsample=i < last)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, groups, last = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups)
        self.up_blocks = nn.ModuleList([  # one more resnet per level than the encoder
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, upsample=i < last)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = replace(config) if config is not None else VAEConfig()  # a copy: the model owns it
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x):
        """(B, 3, H, W) in [-1, 1] -> mean, logvar, each (B, 4, H/f, W/f), f = 2^(levels-1); unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM DiagonalGaussianDistribution clamps the log-variance

    def decode(self, z):
        """Unscaled latent (B, 4, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
