"""The one attention helper shared by the U-Net, the VAE and CLIP."""
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def attention(q, k, v, heads, mask=None, upcast=False):
    """Multi-head scaled dot-product attention softmax(q k^T / sqrt(d)) v.

    q: (B, N, C), k and v: (B, M, C); returns (B, N, C). `mask` is a boolean mask (True =
    attend) or an additive float mask, broadcastable to (B, heads, N, M). `upcast` computes in
    float32 whatever the input dtype: SD 2.x-768-v overflows in fp16 without it
    (diffusers' `upcast_attention`).

    On the CPU under bf16 autocast the attention itself runs in fp32: torch's CPU flash-attention
    backward is ~4x slower in bf16 than in fp32 (toy U-Net training step on 2 cores: 55 vs 14 ms
    of its ~250 ms), and the result is at least as exact.
    """
    b, n, c = q.shape
    dtype = q.dtype
    cpu_autocast = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if upcast or cpu_autocast:
        q, k, v = q.float(), k.float(), v.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    q, k, v = (x.view(b, -1, heads, c // heads).transpose(1, 2) for x in (q, k, v))  # (B, N, C) -> (B, h, N, d)
    with torch.autocast("cpu", enabled=False) if cpu_autocast else nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c).to(dtype)  # (B, h, N, d) -> (B, N, C)
