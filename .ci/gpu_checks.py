"""Two checks of .ci/gpu.sh quick that are not a script run of their own.

    python .ci/gpu_checks.py upcast sd2-768-v|toy   # the 768-v U-Net's upcast attention under fp16 autocast
    python .ci/gpu_checks.py resume RUN RESUMED     # the resumed run's losses continue the uninterrupted run's

Exit 1, with what differs, when a check fails.
"""
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model.attention as attention_module        # noqa: E402
from model.unet import PRESETS, UNet2DCondition   # noqa: E402


def upcast(shapes):
    """SD2-768-v sets upcast_attention: its attention must run in fp32 even inside fp16 autocast
    (SDPA is on autocast's fp16 list), or its logits overflow. One forward and backward at the real
    config (96 x 96 latent) on the GPU, the toy's with upcast on the CPU; every SDPA call must see fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = PRESETS["sd2-768-v"] if shapes == "sd2-768-v" else replace(PRESETS["toy"], upcast_attention=True)
    n = config.sample_size if shapes == "sd2-768-v" else 16
    torch.manual_seed(0)
    unet = UNet2DCondition(config).to(device).train()
    seen, real = [], attention_module.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append(q.dtype)
        return real(q, k, v, attn_mask=attn_mask)

    attention_module.F.scaled_dot_product_attention = spy
    x = torch.randn(1, config.in_channels, n, n, device=device)
    ctx = torch.randn(1, 77, config.cross_attention_dim, device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.float16):
        out = unet(x, torch.tensor([999], device=device), ctx)
    out.float().square().mean().backward()
    attention_module.F.scaled_dot_product_attention = real
    finite = torch.isfinite(out).all().item() and torch.isfinite(unet.conv_in.weight.grad).all().item()
    print(f"upcast attention ({shapes}, {device}): {len(seen)} attention calls inside fp16 autocast, dtypes "
          f"{sorted({str(d) for d in seen})}, output and gradients finite: {finite}")
    return 0 if seen and set(seen) == {torch.float32} and finite else 1


def resume(run, resumed, step):
    """RUN trained without a stop; RESUMED was resumed from RUN's checkpoint at `step`. The first
    resumed step computes the loss of the same weights on the same samples: equal to 1e-6
    (relative). Later steps: equal on the CPU; on a GPU within 1e-2 (backward kernels that add in a
    non-deterministic order perturb the weights at rounding level, and the loss follows)."""
    a, b = [dict(torch.load(os.path.join(r, "checkpoint", "train_state.pt"), weights_only=True)["losses"])
            for r in (run, resumed)]
    after = [k for k in sorted(a) if k > int(step)]
    if not after or [k for k in sorted(b) if k > int(step)] != after:
        print(f"resume check: steps after {step}: {after} in {run}, {[k for k in sorted(b) if k > int(step)]} in {resumed}")
        return 1
    rel = [abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in after]
    ok = rel[0] <= 1e-6 and max(rel) <= (1e-2 if torch.cuda.is_available() else 0)
    print(f"resume check, steps {after[0]}..{after[-1]}: first resumed loss {b[after[0]]:.6f} vs {a[after[0]]:.6f}, "
          f"worst relative difference {max(rel):.2e}: " + ("loss continues exactly" if ok else "LOSSES DIFFER"))
    return 0 if ok else 1


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    sys.exit({"upcast": upcast, "resume": resume}[what](*rest))
