"""What bench.py's sections share: timing that waits for the GPU, the table rows, peak memory,
and stand-ins for the text tower, so that a section times the U-Net and the VAE alone. Like
bench.py, benchmarks/ may import the references (diffusers, transformers): it is not product code."""
import os
import statistics
import time

import torch

from launch import cpu_has_native_bf16
from model import cuda

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync():
    cuda.synchronize()


def median_seconds(fns, runs=3):
    """Median wall time of `runs` calls of each function, the calls interleaved (in alternating
    order) so that load from other processes and cache effects hit both sides alike. On a GPU each
    call is timed to the end of its kernels."""
    times = [[] for _ in fns]
    for i in range(runs):
        pairs = list(zip(fns, times))
        for fn, t in pairs if i % 2 == 0 else pairs[::-1]:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def print_header(title):
    """A comparison table's title and columns, printed before its first row is measured."""
    print(f"\n{title}\n{'what':<32} {'dtype':<5} {'ours s':>8} {'ref s':>8} {'ours/ref':>8} {'max |diff|':>10}", flush=True)


def compare(what, ours_fn, ref_fn, dtype):
    """One row: ours beside the reference, timed in the same run, printed as soon as it is measured."""
    with torch.inference_mode():
        ours_out, ref_out = ours_fn(), ref_fn()  # also the warm-up
        diff = (ours_out.float() - ref_out.float()).abs().max().item()
        ours, ref = median_seconds([ours_fn, ref_fn])
    print(f"{what:<32} {dtype:<5} {ours:8.3f} {ref:8.3f} {ours / ref:8.2f} {diff:10.2e}", flush=True)


def cpu_dtypes():
    """The dtypes a CPU section compares: fp32, and bf16 where the CPU computes it natively (emulated
    bf16 is orders of magnitude slower, so its rows take hours and compare nothing; BENCH_CPU_BF16=1
    runs them anyway)."""
    if cpu_has_native_bf16() or os.environ.get("BENCH_CPU_BF16") == "1":
        return DTYPES
    print("bf16 rows skipped: this CPU emulates bf16 (BENCH_CPU_BF16=1 runs them anyway)", flush=True)
    return {"fp32": torch.float32}


# Peak resident memory of a fresh process (the loads of bench.py's sd2 section, the objectives' steps); printed as
# "baseline_bytes peak_bytes" (after the imports, and at the end). VmHWM rather than ru_maxrss,
# which a child inherits from its parent. safetensors maps the file, so the weights are read
# only when touched: touch every one (a sum) before measuring.
PEAK_RSS = """
def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
"""


class FixedText(torch.nn.Module):
    """A stand-in for the frozen CLIP text tower in the method benchmarks, which time the U-Net and VAE."""

    def __init__(self, width=768):
        super().__init__()
        self.width = width

    def forward(self, ids):
        return torch.randn(len(ids), 77, self.width, generator=torch.Generator().manual_seed(0)).to(ids.device)


class FixedTokenizer:
    def __call__(self, texts):
        return torch.zeros(len(texts), 77, dtype=torch.long)

    def token_counts(self, texts):
        return [3] * len(texts)
