"""bench.py's CUDA sections (python bench.py --device=cuda): the U-Net against diffusers, segment()
throughput, training steps by batch size, what each speed choice buys, where a step's GPU time
goes; and the objectives' training step (the e2e section, CPU and CUDA). Every section runs on the
CPU too under simulated CUDA at the toy's shapes (model/cuda.py; the test suite's dry run)."""
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

from benchmarks.timing import PEAK_RSS, FixedText, FixedTokenizer, compare, median_seconds, print_header, sync
from model import cuda
from model.cuda import tune_for_cuda


@dataclass
class Target:
    """Where the CUDA sections run: a GPU at SD2-base + CLIP-L shapes (512^2), or, for a dry run in CI,
    the CPU under simulated CUDA (model/cuda.py) at the toy's shapes (64^2): the same code, small."""
    device: torch.device
    shapes: str = "sd2-base"         # model.unet / model.vae preset (toy_or_sd2: and the text width)
    size: int = 512                  # image side

    @property
    def name(self):
        return f"{cuda.device_name(self.device)}, {self.shapes} {self.size}^2"


def toy_or_sd2(shapes):
    """The U-Net and VAE preset names and the text width of a bench's shapes."""
    return ("toy", 64) if shapes == "toy" else ("sd2-base", 768)


def objective_step(shapes, objective, decoder_checkpointing, batch, size, device="cpu", steps=3):
    """(median seconds, peak memory in GiB) of one training step (loss, backward, AdamW) of the
    diffusion or e2e objective, at the toy's or SD2-base's shapes, random weights, fp32 on the CPU
    or bf16 autocast on CUDA. CPU memory: the peak RSS of a fresh process (objective_cost)."""
    from digseg import DiGSeg, DiGSegConfig, TextMLP, widen_conv_in
    from model.unet import PRESETS as UNETS, UNet2DCondition
    from model.vae import PRESETS as VAES, AutoencoderKL
    torch.manual_seed(0)
    name, width = toy_or_sd2(shapes)
    with torch.device(device):
        unet, vae = UNet2DCondition(UNETS[name]), AutoencoderKL(VAES[name])
        mlp = TextMLP(width, unet.config.cross_attention_dim)
    widen_conv_in(unet)
    cfg = DiGSegConfig(target="v_prediction", objective=objective)
    model = DiGSeg(cfg, unet, vae, 0.18215, FixedText(width), FixedTokenizer(), mlp).train()
    model.decoder_checkpointing = decoder_checkpointing
    on_cuda = cuda.is_cuda(device)
    tune_for_cuda(model, frozen_dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    image = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    mask = (torch.rand(batch, size, size, device=device) > 0.5).float()

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = model(image, mask, ["a photo of a cat."] * batch,
                              [torch.Generator().manual_seed(i) for i in range(batch)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()                                        # warm-up, and AdamW's state
    cuda.reset_peak_memory(device)
    seconds = median_seconds([step], runs=steps)[0]
    return seconds, cuda.peak_memory_gib(device)[0] if on_cuda else float("nan")


OBJECTIVE_COST = PEAK_RSS + """
import sys
from benchmarks.cuda import objective_step
base = peak_rss()
shapes, objective, ckpt, batch, size = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
seconds, _ = objective_step(shapes, objective, ckpt, batch, size)
print(seconds, peak_rss() - base)
"""


def objective_cases(gpu=None):
    if gpu is None:            # the toy preset's step, and SD2-base at 256^2 (512^2 on a CPU takes minutes a step)
        return [("toy", obj, ckpt, 16, 48) for obj, ckpt in (("diffusion", 0), ("e2e", 0), ("e2e", 1))] + \
               [("sd2", obj, ckpt, 1, 256) for obj, ckpt in (("diffusion", 0), ("e2e", 0), ("e2e", 1))]
    return [(gpu.shapes, obj, ckpt, batch, gpu.size) for batch in (2, 8, 16) for obj, ckpt in
            (("diffusion", 0), ("e2e", 0), ("e2e", 1))]


def bench_e2e(gpu=None):
    """The e2e objective's training step beside the diffusion objective's (the paper's), with and
    without gradient checkpointing through the decoder: seconds per step and peak memory. On the CPU
    each case runs in a fresh process (peak RSS); on CUDA in this one (max allocated)."""
    where = gpu.name if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntraining step by objective ({where}; fp32 on the CPU, bf16 autocast on CUDA; median of 3 steps)")
    base = {}
    for shapes, objective, ckpt, batch, size in objective_cases(gpu):
        if gpu:
            try:
                seconds, peak = objective_step(shapes, objective, bool(ckpt), batch, size, gpu.device)
            except torch.OutOfMemoryError:
                print(f"  {shapes} {size}^2 batch {batch} {objective} checkpointing={ckpt}: out of memory", flush=True)
                continue
            cuda.empty_cache()
        else:
            out = subprocess.run([sys.executable, "-c", OBJECTIVE_COST, shapes, objective, str(ckpt), str(batch), str(size)],
                                 check=True, capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
            seconds, peak = float(out[-2]), int(out[-1]) / 2**30
        key = (shapes, batch, size)
        base.setdefault(key, seconds)
        print(f"  {shapes:3s} {size:3d}^2 batch {batch:2d} {objective:9s} decoder checkpointing={ckpt}: "
              f"{seconds * 1000:8.1f} ms/step ({seconds / base[key]:4.2f}x diffusion), {batch / seconds:6.1f} img/s, "
              f"peak {peak:5.2f} GiB", flush=True)


def sd2_digseg(gpu, trainable="all"):
    """DiGSeg at the target's config (SD2-base) with random weights (text: a fixed stand-in for CLIP-L)."""
    from digseg import DiGSeg, DiGSegConfig, TextMLP, widen_conv_in
    from model.unet import PRESETS as UNETS, UNet2DCondition
    from model.vae import PRESETS as VAES, AutoencoderKL

    torch.manual_seed(0)
    name, width = toy_or_sd2(gpu.shapes)
    with torch.device(gpu.device):
        unet, vae = UNet2DCondition(UNETS[name]), AutoencoderKL(VAES[name])
        mlp = TextMLP(width, unet.config.cross_attention_dim)
    widen_conv_in(unet)
    return DiGSeg(DiGSegConfig(sd2="", trainable=trainable, resolution=gpu.size), unet, vae, 0.18215, FixedText(width),
                  FixedTokenizer(), mlp)


def bench_cuda_unet(gpu):
    """U-Net forward (the latent of a size^2 image, 77 tokens) vs diffusers at batch 2 and 16: under bf16
    autocast over fp32 weights (the training path) and with bf16 weights (inference), each also in
    channels_last."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from model.unet import PRESETS as UNETS, UNet2DCondition
    diffusers_logging.set_verbosity_error()
    torch.manual_seed(0)
    config, dev, n = UNETS[toy_or_sd2(gpu.shapes)[0]], gpu.device, gpu.size // 8
    ref = UNet2DConditionModel.from_config(config.to_dict()).to(dev).eval()
    with torch.device("meta"):
        ours = UNet2DCondition(config).eval()
    ours.load_state_dict(ref.state_dict(), assign=True)              # one copy of the weights, shared
    print_header(f"U-Net vs diffusers on {gpu.name} (median of 3)")
    for dtype in (torch.float32, torch.bfloat16):                    # fp32 weights under autocast, then bf16 weights
        if dtype == torch.bfloat16:
            ref.to(dtype)
            ours.load_state_dict(ref.state_dict(), assign=True)
        for batch in (2, 16):
            x = torch.randn(batch, 4, n, n, device=dev, dtype=dtype)
            t, c = torch.full((batch,), 500, device=dev), torch.randn(batch, 77, config.cross_attention_dim, device=dev,
                                                                      dtype=dtype)
            for layout in (torch.contiguous_format, torch.channels_last):
                ours.to(memory_format=layout)
                ref.to(memory_format=layout)
                name = "NHWC" if layout == torch.channels_last else "NCHW"
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.float32):
                    compare(f"U-Net b{batch} {'autocast' if dtype == torch.float32 else 'bf16 weights'} {name}",
                            lambda: ours(x, t, c), lambda: ref(x, t, c).sample,
                            "amp" if dtype == torch.float32 else "bf16")


def bench_cuda_segment(gpu):
    """segment() on the target's config: masks (classes) or images per second, plain fp32 vs bf16
    weights (eval.py --dtype=bf16 / sample.py --dtype=bf16)."""
    image = torch.rand(3, gpu.size, gpu.size) * 2 - 1
    cases = [("E=1 S=1, 1 class", 1, 1, 1), ("E=1 S=1, 8 classes", 8, 1, 1), ("E=8 S=2, 1 class", 1, 8, 2)]
    print(f"\nsegment(), {gpu.name} (median of 3)")
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = sd2_digseg(gpu).to(dtype).eval()
        with torch.inference_mode():
            for what, K, E, S in cases:
                names = [f"class {i}" for i in range(K)]
                model.segment(image, names, ensemble=E, steps=S, batch_size=max(8, K * E))   # warm-up
                sec = median_seconds([lambda: model.segment(image, names, ensemble=E, steps=S,
                                                            batch_size=max(8, K * E))])[0]
                print(f"  {label:22s} {what:20s} {sec * 1000:8.1f} ms = {K / sec:6.1f} masks/s = {1 / sec:6.1f} images/s",
                      flush=True)
        del model
        cuda.empty_cache()


def bench_cuda_train(gpu, batches=(2, 8, 16, 32, 48)):
    """The training step of train.py without data loading (bf16 autocast over fp32 weights, the
    frozen VAE and text in bf16, fused AdamW, trainable=all), by batch size, with and without
    gradient checkpointing, and at batch 16 with --compile=1 (U-Net and VAE encoder compiled):
    images/s and peak memory."""
    model = sd2_digseg(gpu).train()
    tune_for_cuda(model, frozen_dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    dev, size = gpu.device, gpu.size
    print(f"\ntraining step, {gpu.name}, bf16 autocast (median of 3 steps)")
    cases = [(ckpt, batch, False) for ckpt in (False, True) for batch in batches] + [(False, 16, True)]
    for checkpointing, batch, compiled in cases:
        model.unet.gradient_checkpointing = checkpointing
        if compiled:
            tune_for_cuda(model, compile=True)
        image = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
        mask = (torch.rand(batch, size, size, device=dev) > 0.5).float()

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(image, mask, ["a photo of a cat."] * batch,
                                  [torch.Generator().manual_seed(i) for i in range(batch)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        what = f"checkpointing={int(checkpointing)} compile={int(compiled)} batch {batch:3d}"
        try:
            start = time.perf_counter()
            step()                                       # warm-up (and compiling), AdamW state
            sync()
            first = time.perf_counter() - start
            cuda.reset_peak_memory(dev)
            sec = median_seconds([step])[0]
            peak = cuda.peak_memory_gib(dev)[0]
            print(f"  {what}: {batch / sec:6.1f} img/s, {sec * 1000:7.1f} ms/step, peak {peak:5.1f} GiB"
                  + (f" (first step {first:.0f} s)" if compiled else ""), flush=True)
        except torch.OutOfMemoryError:
            print(f"  {what}: out of memory", flush=True)
        opt.zero_grad(set_to_none=True)
        cuda.empty_cache()


def bench_cuda_choices(gpu):
    """What each speed choice buys on this GPU, side by side in one run: the memory layout (NCHW vs
    channels_last) of the bf16 VAE and of the U-Net's training pass, cudnn.benchmark, and
    torch.compile of the VAE encoder alone (the frozen half of a training step's FLOPs)."""
    from model.unet import PRESETS as UNETS, UNet2DCondition
    from model.vae import PRESETS as VAES, AutoencoderKL
    bf16, layouts = torch.bfloat16, {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
    dev, size, n, name = gpu.device, gpu.size, gpu.size // 8, toy_or_sd2(gpu.shapes)[0]
    torch.manual_seed(0)
    vae = AutoencoderKL(VAES[name]).to(dev).eval().to(bf16)
    x = torch.rand(16, 3, size, size, device=dev, dtype=bf16) * 2 - 1
    z = torch.randn(1, 4, n, n, device=dev, dtype=bf16)
    print(f"\nspeed choices, {gpu.name} (median of 5)")

    def ms(fn, runs=5):
        with torch.inference_mode():
            fn()
            return median_seconds([fn], runs)[0] * 1000

    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        for layout_name, layout in layouts.items():
            vae.to(memory_format=layout)
            xl, zl = x.contiguous(memory_format=layout), z.contiguous(memory_format=layout)
            print(f"  VAE bf16 {layout_name} cudnn.benchmark={int(benchmark)}: encode b16 {ms(lambda: vae.encode(xl)):7.1f} ms,"
                  f" decode b1 {ms(lambda: vae.decode(zl)):6.1f} ms", flush=True)
    for layout_name, layout in layouts.items():
        vae.to(memory_format=layout)
        xl = x.contiguous(memory_format=layout)
        encode = torch.compile(vae.encode, dynamic=False, backend="inductor" if cuda.hardware(dev) else "eager")
        start = time.perf_counter()
        with torch.inference_mode():
            encode(xl)
        sync()
        print(f"  VAE bf16 {layout_name} encode compiled: {ms(lambda: encode(xl)):7.1f} ms (compiling took "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    del vae, x
    unet = UNet2DCondition(replace(UNETS[name], in_channels=8)).to(dev).train()
    for batch in (2, 16):
        xu = torch.randn(batch, 8, n, n, device=dev)
        t = torch.randint(0, 1000, (batch,), device=dev)
        c = torch.randn(batch, 77, unet.config.cross_attention_dim, device=dev)
        for layout_name, layout in layouts.items():
            unet.to(memory_format=layout)
            xl = xu.contiguous(memory_format=layout)

            def step():
                with torch.autocast(dev.type, dtype=bf16):
                    out = unet(xl, t, c)
                out.float().square().mean().backward()
                unet.zero_grad(set_to_none=True)

            step()
            print(f"  U-Net fwd+bwd b{batch} autocast {layout_name} cudnn.benchmark=1: "
                  f"{median_seconds([step], 5)[0] * 1000:7.1f} ms", flush=True)
    torch.backends.cudnn.benchmark = False


def bench_cuda_profile(gpu):
    """Where a training step's GPU time goes (bf16, batch 16, as train.py runs it), and one-class
    segment(): the top kernels by GPU time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    model = sd2_digseg(gpu).train()
    tune_for_cuda(model, frozen_dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    dev, size = gpu.device, gpu.size
    image = torch.rand(16, 3, size, size, device=dev) * 2 - 1
    mask = (torch.rand(16, size, size, device=dev) > 0.5).float()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda.hardware(dev) else [])
    sort = "self_cuda_time_total" if cuda.hardware(dev) else "self_cpu_time_total"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model.loss(image, mask, ["a photo of a cat."] * 16, [torch.Generator().manual_seed(i) for i in range(16)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def show(title, fn):
        fn()
        sync()
        with profile(activities=activities) as prof:
            fn()
            sync()
        print(f"\n{title}\n" + prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60), flush=True)

    show(f"training step, batch 16, bf16, {gpu.name} (profile)", step)
    model.eval()
    image1 = torch.rand(3, size, size) * 2 - 1
    with torch.inference_mode():
        show("segment() E=1 S=1 one class, fp32 weights (profile)", lambda: model.segment(image1, ["cat"], ensemble=1, steps=1))
