"""The one attention helper shared by the U-Net, the VAE and CLIP."""
import torch.nn.functional as F


def attention(q, k, v, heads, mask=None, upcast=False):
    """Multi-head scaled dot-product attention softmax(q k^T / sqrt(d)) v.

    q: (B, N, C), k and v: (B, M, C); returns (B, N, C). `mask` is a boolean mask (True =
    attend) or an additive float mask, broadcastable to (B, heads, N, M). `upcast` computes in
    float32 whatever the input dtype: SD 2.x-768-v overflows in fp16 without it
    (diffusers' `upcast_attention`).
    """
    b, n, c = q.shape
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    q, k, v = (x.view(b, -1, heads, c // heads).transpose(1, 2) for x in (q, k, v))  # (B, N, C) -> (B, h, N, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c).to(dtype)  # (B, h, N, d) -> (B, N, C)
