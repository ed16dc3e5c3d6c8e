"""DiGSeg on a GPU: the same math, faster. train.py and bench.py call these; on the CPU they do nothing.

What each choice buys, and what was tried and left out (channels_last: PyTorch's GroupNorm
converts it back; cudnn.benchmark: no change), is measured in docs/results.md, "On a GPU".
"""


def tune_for_cuda(model, frozen_dtype=None, compile=False):
    """A DiGSeg, tuned in place for CUDA (no-op elsewhere):
    - frozen_dtype: the frozen VAE, text tower and CLIPs stored in this dtype (bf16 when training
      under bf16 autocast), so their fp32 weights are not cast at every call. The latents stay fp32
      (DiGSeg.encode_image): only these networks compute in bf16;
    - compile: torch.compile of the U-Net and of the VAE encoder alone, with static shapes (a new
      image size compiles once more), in place, so the saved names stay the U-Net's. The encoder
      runs twice per training step (image and mask). Compiling the whole loss, with its CPU
      generators and Python lists of prompts, recompiled at every step instead."""
    if model.device.type != "cuda":
        return model
    if frozen_dtype is not None:
        for frozen in (model.vae, model.text_encoder, model.clip, model.proposal_clip):
            if frozen is not None:
                frozen.to(frozen_dtype)
        model.clear_caches()
    if compile:
        model.unet.compile(dynamic=False)
        model.vae.encoder.compile(dynamic=False)
    return model


def to_device(x, device):
    """A host tensor on `device` without a host synchronisation: on CUDA it is pinned, then copied
    asynchronously (a plain copy from pageable memory waits for the GPU)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
