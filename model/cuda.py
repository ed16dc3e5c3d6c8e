"""DiGSeg on a GPU: the same math, faster. Every branch that only CUDA takes asks `is_cuda` here,
and the few torch.cuda calls the scripts make go through this file.

What each choice buys, and what was tried and left out (channels_last: PyTorch's GroupNorm
converts it back; cudnn.benchmark: no change), is measured in docs/results.md, "On a GPU".

Simulated CUDA (DIGSEG_SIMULATE_CUDA=1). CI has no GPU, and a branch that no CPU run takes is a
branch no test sees (a renamed attribute in tune_for_cuda once stopped every GPU run while the
CPU suite passed). With the variable set, is_cuda() answers yes for the CPU as well, so train.py,
eval.py, sample.py and bench.py take their CUDA branches on CPU tensors, line for line. Only what
needs the hardware itself is answered on the host, in the functions below and nowhere else:
pinning is skipped (pin), memory is the process's peak RSS (peak_memory_gib), synchronize and
set_device do nothing, DDP gets no device_ids, and torch.compile uses dynamo's "eager" backend:
the graph capture and its guards, which decide every recompile, are dynamo's own; only the kernel
code generation is left out.
"""
import os
import resource

import torch

SIMULATE = "DIGSEG_SIMULATE_CUDA"


def simulated():
    """Whether the CUDA branches run on the CPU (DIGSEG_SIMULATE_CUDA=1; read at every call, so a
    test can set it for one block)."""
    return os.environ.get(SIMULATE) == "1"


def is_cuda(device):
    """The device decision of every CUDA-only branch: a CUDA device, or the CPU under simulation."""
    return torch.device(device).type == "cuda" or (simulated() and torch.device(device).type == "cpu")


def hardware(device):
    """Whether `device` is a real GPU (what the stubs below check before calling torch.cuda)."""
    return torch.device(device).type == "cuda"


def tune_for_cuda(model, frozen_dtype=None, compile=False):
    """A DiGSeg, tuned in place for CUDA (no-op elsewhere):
    - frozen_dtype: the frozen VAE, text tower and CLIPs (the conditioner's and the proposer's, which
      may be another one: use_proposal_clip) stored in this dtype (bf16 when training under bf16
      autocast), so their fp32 weights are not cast at every call. The latents stay fp32
      (DiGSeg.encode_image): only these networks compute in bf16;
    - compile: torch.compile of the U-Net and of the VAE encoder alone, with static shapes (a new
      image size compiles once more), in place, so the saved names stay the U-Net's. The encoder
      runs twice per training step (image and mask). DiGSeg hands the U-Net its timestep as a
      tensor, never a Python int, which static shapes would bake into the graph: one recompile
      per DDIM timestep. Compiling the whole loss,
      with its CPU generators and Python lists of prompts, recompiled at every step instead."""
    if not is_cuda(model.device):
        return model
    if frozen_dtype is not None:
        proposal_clip = model.proposer.clip if model.proposer is not None else None
        for frozen in (model.vae, model.text_encoder, model.clip, proposal_clip):
            if frozen is not None:
                frozen.to(frozen_dtype)
        model.clear_caches()
    if compile:
        backend = "inductor" if hardware(model.device) else "eager"
        model.unet.compile(dynamic=False, backend=backend)
        model.vae.encoder.compile(dynamic=False, backend=backend)
    return model


def to_device(x, device):
    """A host tensor on `device` without a host synchronisation: on CUDA it is pinned, then copied
    asynchronously (a plain copy from pageable memory waits for the GPU)."""
    if is_cuda(device):
        return pin(x).to(device, non_blocking=True)
    return x.to(device)


def pin(x):
    """x in page-locked host memory (what an asynchronous copy to the GPU needs); x itself where no GPU exists."""
    return x.pin_memory() if torch.cuda.is_available() else x


def loader_pins(device):
    """Whether the DataLoader should pin its batches (only with a GPU to copy them to)."""
    return is_cuda(device) and torch.cuda.is_available()


def set_device(device):
    """Make `device` the current GPU of this process (torchrun: the GPU of its LOCAL_RANK)."""
    if hardware(device):
        torch.cuda.set_device(device)


def ddp_device_ids(device):
    """DistributedDataParallel's device_ids: the process's one GPU; None for the CPU (gloo)."""
    return [torch.device(device).index] if hardware(device) else None


def synchronize(device=None):
    """Wait for the GPU's queued kernels (timing); nothing to wait for on the CPU."""
    if torch.cuda.is_available() and (device is None or hardware(device)):
        torch.cuda.synchronize(device)


def empty_cache():
    """Hand the GPU's cached, unused blocks back (between benchmark cases); nothing to do elsewhere."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device):
    if hardware(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """(GiB, what was measured): the GPU's max allocated memory, or the process's peak RSS."""
    if hardware(device):
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU memory (max allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process memory (peak RSS)"


def device_name(device):
    """The GPU's name, for every printed figure; the CPU's capability where there is none."""
    if hardware(device):
        return torch.cuda.get_device_name(device)
    what = f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return what + (", simulated CUDA" if simulated() else "")
