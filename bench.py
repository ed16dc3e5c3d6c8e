"""Speed and memory side by side with the reference implementations (diffusers, transformers),
same threads, same configs, random weights.

    python bench.py                  # every CPU section
    python bench.py --only=sd2       # comma-separated sections
    python bench.py --only=toy       # where a step of command 1's fine-tuning spends its time
    python bench.py --device=cuda    # the GPU sections: U-Net vs diffusers at batch 2 and 16 (autocast
                                     # over fp32 weights, and bf16 weights), segment() throughput,
                                     # training steps by batch size with and without checkpointing
    python bench.py --device=cuda --only=choices,profile   # what each speed choice buys (layouts,
                                     # cudnn.benchmark, compiled VAE); where a step's GPU time goes
"""
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from benchmarks.cuda import (Target, bench_cuda_choices, bench_cuda_profile, bench_cuda_segment, bench_cuda_train,
                             bench_cuda_unet, bench_e2e)
from benchmarks.timing import PEAK_RSS, FixedText, FixedTokenizer, compare, cpu_dtypes, median_seconds, print_header
from launch import cpu_has_native_bf16, parse_settings, run
from model import cuda


LOAD_OURS = PEAK_RSS + """
import sys
import torch
from model.unet import UNetConfig, UNet2DCondition
from model.files import load_into, read_state_dict
base = peak_rss()
folder = sys.argv[1]
with torch.device("meta"):
    unet = UNet2DCondition(UNetConfig.from_json(folder + "/config.json"))
load_into(unet, read_state_dict(folder + "/diffusion_pytorch_model.safetensors"), folder)
sum(float(p.detach().sum()) for p in unet.parameters())
print(base, peak_rss())
"""
LOAD_DIFFUSERS = PEAK_RSS + """
import sys
from diffusers import UNet2DConditionModel
base = peak_rss()
unet = UNet2DConditionModel.from_pretrained(sys.argv[1])
sum(float(p.detach().sum()) for p in unet.parameters())
print(base, peak_rss())
"""


def peak_load_rss(script, folder):
    out = subprocess.run([sys.executable, "-c", script, folder], check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.split()
    base, peak = int(out[-2]), int(out[-1])
    return peak - base


def bench_sd2():
    """SD2 U-Net (latent 64x64, batch 2, 77 text tokens) and VAE (512x512 encode and decode, batch 1)."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from model.unet import UNet2DCondition, UNetConfig
    from model.vae import AutoencoderKL, VAEConfig

    diffusers_logging.set_verbosity_error()  # its advice on casting with .to() does not apply here
    torch.manual_seed(0)
    dtypes = cpu_dtypes()
    print_header(f"SD2 vs diffusers ({torch.get_num_threads()} threads; median of 3)")
    with tempfile.TemporaryDirectory() as tmp:
        ref = UNet2DConditionModel.from_config(UNetConfig().to_dict()).eval()
        ref.save_pretrained(os.path.join(tmp, "unet"))
        with torch.device("meta"):
            ours = UNet2DCondition(UNetConfig()).eval()
        sample, t, context = torch.randn(2, 4, 64, 64), torch.tensor([10, 900]), torch.randn(2, 77, 1024)
        for name, dtype in dtypes.items():
            ref.to(dtype)
            ours.load_state_dict(ref.state_dict(), assign=True)  # share the weights: one copy in memory
            x, c = sample.to(dtype), context.to(dtype)
            compare("U-Net 64x64 latent, batch 2", lambda: ours(x, t, c), lambda: ref(x, t, c).sample, name)
        del ref, ours
        weight_bytes = os.path.getsize(os.path.join(tmp, "unet", "diffusion_pytorch_model.safetensors"))
        rss_ours = peak_load_rss(LOAD_OURS, os.path.join(tmp, "unet"))
        rss_ref = peak_load_rss(LOAD_DIFFUSERS, os.path.join(tmp, "unet"))

    ref = DiffusersVAE.from_config(VAEConfig().to_dict()).eval()
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig()).eval()
    image, latent = torch.rand(1, 3, 512, 512) * 2 - 1, torch.randn(1, 4, 64, 64)
    for name, dtype in dtypes.items():
        ref.to(dtype)
        ours.load_state_dict(ref.state_dict(), assign=True)
        x, z = image.to(dtype), latent.to(dtype)
        compare("VAE encode 512x512 (mean)", lambda: ours.encode(x)[0], lambda: ref.encode(x).latent_dist.mean, name)
        compare("VAE decode 64x64 -> 512x512", lambda: ours.decode(z), lambda: ref.decode(z).sample, name)
    del ref, ours
    print(f"U-Net load + touch every weight, peak RSS above baseline (fp32 safetensors, "
          f"weights {weight_bytes / 2**30:.2f} GiB): "
          f"ours {rss_ours / 2**30:.2f} GiB ({rss_ours / weight_bytes:.2f}x), "
          f"diffusers {rss_ref / 2**30:.2f} GiB ({rss_ref / weight_bytes:.2f}x)")


def bench_clip():
    """CLIP text tower on 16 prompts x 77 tokens and vision tower on 8 images at 224^2, ViT-L/14."""
    import transformers

    from model.clip import CLIP, PRESETS

    torch.manual_seed(0)
    dtypes = cpu_dtypes()
    print_header(f"CLIP vs transformers ({torch.get_num_threads()} threads; median of 3)")
    ref = transformers.CLIPModel(transformers.CLIPConfig.from_dict(PRESETS["clip-vit-l14"].to_dict())).eval()
    with torch.device("meta"):
        ours = CLIP(PRESETS["clip-vit-l14"]).eval()
    ids = torch.randint(0, 49406, (16, 77))
    ids[:, -1] = 49407
    pixels = torch.randn(8, 3, 224, 224)
    for name, dtype in dtypes.items():
        ref.to(dtype)
        ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}, assign=True)
        px = pixels.to(dtype)
        compare("CLIP-L text, 16 x 77 tokens", lambda: ours.text(ids)[0], lambda: ref.text_model(input_ids=ids).last_hidden_state,
                name)
        compare("CLIP-L vision, 8 x 224^2", lambda: ours.image(px)[0],
                lambda: ref.visual_projection(ref.vision_model(pixel_values=px).pooler_output), name)


def bench_digseg():
    """segment() at the real SD2 config (random weights, 512^2, 1 trailing step): K = 8 classes x
    E = 4 members denoised in batches vs one (class, member) at a time."""
    from digseg import DiGSeg, DiGSegConfig, TextMLP, widen_conv_in
    from model.unet import PRESETS as UNETS, UNet2DCondition
    from model.vae import PRESETS as VAES, AutoencoderKL

    torch.manual_seed(0)
    unet, vae = UNet2DCondition(UNETS["sd2-base"]), AutoencoderKL(VAES["sd2-base"])
    widen_conv_in(unet)

    cfg = DiGSegConfig(sd2="", resolution=512)
    model = DiGSeg(cfg, unet, vae, 0.18215, FixedText(), FixedTokenizer(), TextMLP(768, 1024)).eval()
    image, names = torch.rand(3, 512, 512) * 2 - 1, [f"class {i}" for i in range(8)]
    with torch.inference_mode():
        batched, single = median_seconds([lambda: model.segment(image, names, ensemble=4, steps=1, batch_size=8),
                                          lambda: model.segment(image, names, ensemble=4, steps=1, batch_size=1)], runs=1)
    print(f"\nsegment(), SD2 config, 512^2, K=8 x E=4, 1 step: batched (8) {batched:.1f} s, one at a time {single:.1f} s: "
          f"{single / batched:.2f}x faster batched ({batched / 32:.2f} s per (class, member) vs {single / 32:.2f} s)")


def bench_train():
    """One training step at the real config (random weights, 512^2, batch 1, CPU): trainable all vs paper."""
    from digseg import DiGSeg, DiGSegConfig, TextMLP, widen_conv_in
    from model.unet import PRESETS as UNETS, UNet2DCondition
    from model.vae import PRESETS as VAES, AutoencoderKL

    torch.manual_seed(0)
    image, mask = torch.rand(1, 3, 512, 512) * 2 - 1, (torch.rand(1, 512, 512) > 0.5).float()
    times = {}
    for trainable in ("all", "paper"):
        unet, vae = UNet2DCondition(UNETS["sd2-base"]), AutoencoderKL(VAES["sd2-base"])
        widen_conv_in(unet)
        model = DiGSeg(DiGSegConfig(sd2="", trainable=trainable), unet, vae, 0.18215, FixedText(), FixedTokenizer(), TextMLP(768, 1024))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad()
            model.loss(image, mask, ["a photo of a cat."], [torch.Generator().manual_seed(0)]).backward()
            opt.step()

        step()                              # warm-up (and AdamW's state allocation)
        times[trainable] = (median_seconds([step], runs=2)[0], sum(p.numel() for p in params))
        del model, unet, vae, opt
    for k, (t, n) in times.items():
        print(f"training step, SD2 config, 512^2, batch 1, trainable={k:5s} ({n:,} parameters): {t:.1f} s")
    print(f"paper / all step time: {times['paper'][0] / times['all'][0]:.2f}")


def bench_toy(steps=20):
    """Where a step of command 1's fine-tuning spends its time: train.py's toy preset (batch 16, 48 px
    crops, p_absent 0.3, t_max_share 0.75) on the toy U-Net and VAE with random weights, split into
    the data (drawing the scenes), the two VAE encodes, the U-Net's forward and backward, and AdamW."""
    import time

    import data
    from digseg import DiGSeg
    from model.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, train_bpe
    from model.unet import UNet2DCondition
    from model.vae import AutoencoderKL
    from model.weights import save_clip_folder, save_sd2_folder
    from toyworld.pretrain import TEMPLATES, TOY_CLIP_TEXT, TOY_CLIP_VISION, TOY_UNET, TOY_VAE

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_sd2_folder(os.path.join(tmp, "sd2"), UNet2DCondition(TOY_UNET), AutoencoderKL(TOY_VAE), "v_prediction")
        tok = train_bpe([t.format(c) for t in TEMPLATES for c in data.TOY_CLASSES] * 4, 300, os.path.join(tmp, "bpe"))
        clip = CLIP(CLIPConfig(CLIPTextConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eot, **TOY_CLIP_TEXT),
                               CLIPVisionConfig(**TOY_CLIP_VISION), projection_dim=64))
        save_clip_folder(os.path.join(tmp, "clip"), clip, os.path.join(tmp, "bpe"))
        model = DiGSeg.from_weights(os.path.join(tmp, "sd2"), os.path.join(tmp, "clip"), resolution=64,
                                    target="v_prediction").train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    train_set = data.ToyTrain("train", size=48, p_absent=0.3)
    print(f"\nA toy fine-tuning step, batch 16 at 48 px: U-Net {TOY_UNET.block_out_channels}, VAE "
          f"{TOY_VAE.block_out_channels} ({torch.get_num_threads()} threads; median of {steps} steps after 3)", flush=True)
    times = []
    for i in range(steps + 3):
        clock = [time.perf_counter()]
        batch = data.collate([train_set[j] for j in range(16 * i, 16 * i + 16)])
        gens = [torch.Generator().manual_seed(j) for j in range(16)]
        clock.append(time.perf_counter())
        with torch.no_grad():                    # timed alone: loss() encodes them again, as train.py's step does
            model.encode_image(batch["image"]), model.encode_mask(batch["mask"])
        clock.append(time.perf_counter())
        loss = model.loss(batch["image"], batch["mask"], batch["prompt"], gens, 0.75)
        clock.append(time.perf_counter())
        loss.backward()
        clock.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.append(time.perf_counter())
        times.append([b - a for a, b in zip(clock, clock[1:])])
    med = [1000 * statistics.median(t[k] for t in times[3:]) for k in range(5)]
    med[2] -= med[1]                             # the forward without the encodes
    for name, ms in zip(("data", "VAE encodes (image, mask)", "U-Net forward + loss", "backward", "clip + AdamW"), med):
        print(f"  {name:<28} {ms:7.1f} ms  {100 * ms / sum(med):4.0f} %", flush=True)
    print(f"  {'step':<28} {sum(med):7.1f} ms  {16000 / sum(med):.0f} img/s", flush=True)


SECTIONS = {"sd2": bench_sd2, "clip": bench_clip, "digseg": bench_digseg, "train": bench_train, "e2e": bench_e2e,
            "toy": bench_toy}
CUDA_SECTIONS = {"unet": bench_cuda_unet, "segment": bench_cuda_segment, "train": bench_cuda_train,
                 "choices": bench_cuda_choices, "profile": bench_cuda_profile, "e2e": bench_e2e}
SECTIONS_HELP = f"\nSections: CPU {', '.join(SECTIONS)}; CUDA {', '.join(CUDA_SECTIONS)}."


@dataclass
class Settings:
    device: str = "cpu"              # cpu: the CPU sections; cuda: the GPU sections
    only: str = ""                   # comma-separated sections (default: all of the device's)
    threads: int = 0                 # torch threads (0: torch's default)
    shapes: str = "sd2-base"         # the CUDA sections' models: sd2-base (512^2), or toy (64^2: a dry run of the code)


def main(argv=None):
    args = parse_settings(Settings, sys.argv[1:] if argv is None else argv, __doc__ + SECTIONS_HELP,
                          {"device": ("cpu", "cuda"), "shapes": ("sd2-base", "toy")})
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = CUDA_SECTIONS if args.device == "cuda" else SECTIONS
    if args.device == "cuda":
        if not torch.cuda.is_available() and not cuda.simulated():
            raise SystemExit(f"--device=cuda: no CUDA device here (a dry run on the CPU: {cuda.SIMULATE}=1 "
                             f"python bench.py --device=cuda --shapes=toy)")
        gpu = Target(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.shapes,
                     64 if args.shapes == "toy" else 512)
        print(f"{cuda.device_name(gpu.device)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    else:
        native = torch.backends.cpu.get_cpu_capability()
        print(f"CPU capability {native}; native bf16 matmul: {'yes (avx512_bf16/amx)' if cpu_has_native_bf16() else 'NO - bf16 rows are emulated and slow, compare fp32 only'}", flush=True)
    for name in (args.only or ",".join(sections)).split(","):
        if name not in sections:
            raise SystemExit(f"--only={name}: not a {args.device} section; valid: {', '.join(sections)}")
        sections[name](gpu) if args.device == "cuda" else sections[name]()


if __name__ == "__main__":
    run(main)
