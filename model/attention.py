"""The one attention helper shared by the U-Net, the VAE and CLIP."""
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def attention(q, k, v, heads, mask=None, upcast=False):
    """Multi-head scaled dot-product attention softmax(q k^T / sqrt(d)) v.

    q: (B, N, C), k and v: (B, M, C); returns (B, N, C). `mask` is a boolean mask (True =
    attend) or an additive float mask, broadcastable to (B, heads, N, M). `upcast` computes in
    float32 whatever the input dtype and whatever autocast says, on any device: SD 2.x-768-v
    overflows in fp16 without it (diffusers' `upcast_attention`). Autocast puts SDPA on its
    lower-precision list, so an upcast attention runs with autocast off.

    On the CPU under autocast every attention runs in fp32: there torch's bf16 flash-attention
    backward is several times slower than fp32's (bench.py; docs/results.md), and fp32 is at least
    as exact.
    """
    b, n, c = q.shape
    dtype, device = q.dtype, q.device.type
    autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
    fp32 = upcast or (device == "cpu" and autocast)
    if fp32:
        q, k, v = q.float(), k.float(), v.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    q, k, v = (x.view(b, -1, heads, c // heads).transpose(1, 2) for x in (q, k, v))  # (B, N, C) -> (B, h, N, d)
    with torch.autocast(device, enabled=False) if fp32 and autocast else nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c).to(dtype)  # (B, h, N, d) -> (B, N, C)
