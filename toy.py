"""The toy world: the whole of DiGSeg trained and evaluated on a CPU in minutes.

    python toy.py                  # pretrain a tiny VAE and CLIP, fine-tune DiGSeg, segment, evaluate
    python toy.py --help

Stable Diffusion's VAE and CLIP were pretrained on web images before anyone segmented with
them. Here the same model classes, in tiny configurations, are pretrained on a procedural
world of coloured shapes (data.toy_scene) and saved in the formats the real loaders read
(a diffusers SD2 folder, an HF CLIP folder with a BPE vocabulary trained by `tokenizers`).
Then DiGSeg is fine-tuned on top by running train.py with its `toy` preset -- the same digseg.py
and train.py as on A100s -- and evaluated by running eval.py on the toy validation split.

Each stage records its settings in <its folder>/toy_stage.json and is skipped when they match
(delete out/toy to start over); a stage whose settings changed is rebuilt, and the stages after it.
DIGSEG_TOY_QUICK=1 (the tests, and notebooks under test) builds a quick world with few steps.

Precision: DiGSeg's fine-tuning, the longest stage, trains under bf16 autocast over fp32 weights,
as the paper's presets do, where bf16 is computed natively: on a GPU, or on a CPU with AVX512-BF16
or AMX (launch.cpu_has_native_bf16); there it is the faster choice. Elsewhere torch emulates bf16
far slower than fp32, so it trains in fp32. --dtype=fp32 or bf16 overrides the choice; it is part
of stage 3's record. The pretraining stages train in fp32 everywhere (docs/results.md).
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
from digseg import DiGSeg, mask_to_image
from launch import POSITIVE, cpu_has_native_bf16, parse_settings, run
from model.clip import CLIP, MEAN, STD, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, train_bpe
from model.unet import PRESETS as UNET_PRESETS, UNet2DCondition
from model.vae import PRESETS as VAE_PRESETS, AutoencoderKL
from model.diffusion import add_noise, ddim_sample, ddim_timesteps, scaled_linear_alphas_cumprod, velocity
from model.weights import file_digest, load_clip, load_sd2, save_clip_folder, save_sd2_folder, write_text_atomic
from plot import image_grid, line_plot

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- the tiny models: same classes as SD2 and CLIP, small configurations -----------------------

TOY_VAE, TOY_UNET = VAE_PRESETS["toy"], UNET_PRESETS["toy"]     # 64 px -> 16 x 16 x 4 latent; a 2-level U-Net
TOY_CLIP_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=77, hidden_act="quick_gelu")
TOY_CLIP_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       image_size=64, patch_size=8, hidden_act="quick_gelu")
VAE_BATCH = 16              # stage 1's batch of 32 px crops (batch 32 is no better: docs/results.md)
TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a {} shape.", "the {}.")


def default_dtype():
    """Stage 3's precision: bf16 where train.py will run on a GPU (it picks CUDA when there is one)
    or on a CPU that computes bf16 natively; fp32 on other CPUs, which emulate bf16 slowly."""
    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "fp32"


def log(msg):
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def optimizer_step(opt, loss, step, steps, lr, curve, name, clip=None):
    """One step of a pretraining stage: backward (gradient norm clipped to 1 over `clip` if given),
    AdamW, the learning rate of the next step on a cosine from `lr` to 0, the loss logged."""
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    for g in opt.param_groups:
        g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
    curve.append(loss.item())
    if step % 100 == 0 or step == steps - 1:
        log(f"{name} step {step}/{steps} loss {loss.item():.4f}")


def scenes(seed, n, size=64):
    """n toy scenes as tensors: images (n, 3, S, S) in [-1, 1], labels (n, S, S) (-1 = no shape)."""
    imgs, labs = zip(*(data.toy_scene(seed, i, size) for i in range(n)))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(np.stack(labs)).long()


# ---- stage 1: the VAE, an autoencoder of toy images and of toy masks ---------------------------

def pretrain_vae(steps, batch=VAE_BATCH, crop=32, seed=0):
    """Reconstruct images and masks (2y - 1 on 3 channels, what DiGSeg will feed it), with a small
    KL term as in SD's VAE. The latent scale is set afterwards to 1 / std of image latents (as SD's
    0.18215 was chosen), so the diffusion sees unit-variance latents.

    Trained on random crop x crop windows: the VAE is convolutional (its one attention layer works
    at any size), so like SD's VAE (trained at 256 px, used at 512) it transfers to whole scenes,
    and a 32 px crop costs a quarter of a 64 px scene; in the same time, crops reconstruct small
    shapes that whole scenes smeared away. fp32 on every CPU: under bf16 autocast the VAE, and
    DiGSeg on top of it, came out worse. Both measured in docs/results.md ("The toy world")."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(TOY_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0, fused=True)
    x_all, y_all = scenes(seed + 101, 2048)
    curve = []
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch,))
        n_masks = batch // 4                            # masks are easy to reconstruct; images get 3/4
        cls = torch.randint(0, len(data.TOY_CLASSES), (n_masks,))
        masks = (y_all[idx[:n_masks]] == cls[:, None, None]).float()
        x = torch.cat([x_all[idx[n_masks:]], mask_to_image(masks)])
        top, left = torch.randint(0, x.shape[-1] - crop + 1, (2,)).tolist()
        x = x[:, :, top:top + crop, left:left + crop]                # (B, 3, crop, crop)
        mean, logvar = vae.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        rec = vae.decode(z)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        optimizer_step(opt, loss, step, steps, 2e-3, curve, "vae")
    with torch.no_grad():
        z = vae.encode(x_all[:256])[0]
        vae.config.scaling_factor = float(1 / z.std())
    log(f"vae latent scale 1/std = {vae.config.scaling_factor:.4f}")
    return vae.eval(), curve


# ---- stage 2: CLIP, image-text pretraining on toy scenes ----------------------------------------

def pretrain_clip(out, steps, batch=64, seed=0):
    """A tiny CLIP trained on (scene, class prompt) pairs. A scene holds up to 3 classes, so instead
    of a softmax over the batch we use a sigmoid loss (SigLIP, Zhai et al. 2023) on every
    (image, class prompt) pair: positive when the class is in the image. The BPE vocabulary is
    trained first with the `tokenizers` library on the prompt templates."""
    torch.manual_seed(seed)
    texts = [t.format(c) for t in TEMPLATES for c in data.TOY_CLASSES] + ["background", "shape", "photo"]
    vocab_dir = os.path.join(out, "bpe")
    tokenizer = train_bpe(texts * 4, vocab_size=300, out_dir=vocab_dir)
    cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eot, **TOY_CLIP_TEXT),
                     vision_config=CLIPVisionConfig(**TOY_CLIP_VISION), projection_dim=64)
    clip = CLIP(cfg)
    clip.tokenizer = tokenizer
    bias = torch.nn.Parameter(torch.tensor(-5.0))
    opt = torch.optim.AdamW(list(clip.parameters()) + [bias], lr=1e-3, weight_decay=0.05, fused=True)
    x_all, y_all = scenes(seed + 202, 2048)
    present = torch.stack([(y_all == c).flatten(1).any(1) for c in range(len(data.TOY_CLASSES))], 1).float()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch,))
        pixels = ((x_all[idx] + 1) / 2 - mean) / std
        if torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        template = TEMPLATES[step % len(TEMPLATES)]
        ids = tokenizer([template.format(c) for c in data.TOY_CLASSES])
        img = F.normalize(clip.image(pixels)[0], dim=-1)             # (B, E)
        txt = F.normalize(clip.text(ids)[1], dim=-1)                 # (6, E)
        logits = clip.logit_scale.exp() * img @ txt.T + bias         # (B, 6)
        loss = F.binary_cross_entropy_with_logits(logits, present[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, np.log(100))
        if step % 100 == 0 or step == steps - 1:
            acc = ((logits > 0).float() == present[idx]).float().mean()
            log(f"clip step {step}/{steps} loss {loss.item():.4f} presence accuracy {acc:.3f}")
    threshold = float(-bias.detach() / clip.logit_scale.detach().exp())              # cos where the sigmoid crosses 0.5
    log(f"clip: a class is present when cos > {threshold:.3f}")
    return clip.eval(), vocab_dir, threshold


# ---- stage 2b (--prior=1): the U-Net as a text-to-image generator, SD2's own pretraining in small ----

def caption(labels):
    """A scene's caption, its classes in class order: "a circle. a star." (a comma would end the
    text: the toy BPE vocabulary has no comma, and an unknown character becomes end-of-text)."""
    return " ".join(f"a {data.TOY_CLASSES[c]}." for c in sorted(int(v) for v in labels.unique() if v >= 0))


def pretrain_prior(vae, vae_scale, clip, steps, batch=32, scenes_max=8000, p_uncond=0.1, seed=0):
    """The toy U-Net (4 input channels, as SD2's) trained as a conditional latent diffusion model:
    v-prediction on VAE latents of toy scenes, conditioned on their captions through the frozen toy
    CLIP text tower and a projection to the U-Net's cross-attention width, the caption dropped
    (empty) with probability p_uncond for classifier-free guidance. The projection is trained with
    it and then dropped: DiGSeg puts a fresh MLP on top, as the paper does on SD2 (whose U-Net was
    trained on OpenCLIP-H, while DiGSeg feeds it CLIP-L through a new MLP).
    -> (U-Net, projection, loss curve)."""
    from digseg import TextMLP
    torch.manual_seed(seed)
    n = min(scenes_max, batch * steps)                   # no more scenes than the steps can see
    x_all, y_all = scenes(seed + 303, n)
    with torch.no_grad():
        z_all = torch.cat([vae.encode(x_all[i:i + 256])[0] for i in range(0, n, 256)]) * vae_scale   # (n, 4, h, w)
        captions = [caption(y) for y in y_all]
        hidden = {c: clip.text(clip.tokenizer([c]))[0][0] for c in set(captions) | {""}}             # (77, D)
    unet, proj = UNet2DCondition(TOY_UNET), TextMLP(clip.config.text_config.hidden_size, TOY_UNET.cross_attention_dim)
    params = list(unet.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    ab = scaled_linear_alphas_cumprod()
    curve = []
    for step in range(steps):
        idx = torch.randint(0, n, (batch,))
        drop = torch.rand(batch) < p_uncond
        ctx = proj(torch.stack([hidden["" if d else captions[i]] for i, d in zip(idx.tolist(), drop.tolist())]))
        z0, eps, t = z_all[idx], torch.randn(batch, *z_all.shape[1:]), torch.randint(0, 1000, (batch,))
        loss = F.mse_loss(unet(add_noise(z0, eps, t, ab), t, ctx), velocity(z0, eps, t, ab))
        optimizer_step(opt, loss, step, steps, 1e-3, curve, "prior", clip=params)
    return unet.eval(), proj.eval(), curve


@torch.no_grad()
def prior_samples(unet, proj, vae, vae_scale, clip, threshold, per_class=6, steps=20, guidance=3.0, seed=0):
    """Generate per_class scenes for each prompt "a {class}." with classifier-free guidance
    (pred = uncond + g (cond - uncond)) through model.diffusion.ddim_sample, DiGSeg's DDIM.
    -> (images (6 * per_class, H, W, 3) in [0, 1], hit rate: the share in which the toy CLIP
    finds the asked class, cos(image, "a photo of a {class}.") > its threshold)."""
    ab = scaled_linear_alphas_cumprod()
    uncond = proj(clip.text(clip.tokenizer([""]))[0])                                  # (1, 77, C)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    names = list(data.TOY_CLASSES)
    classes_text = F.normalize(clip.text(clip.tokenizer([f"a photo of a {c}." for c in names]))[1], dim=-1)
    images, hits = [], 0
    for k, name in enumerate(names):
        cond = proj(clip.text(clip.tokenizer([f"a {name}."]))[0])
        ctx = torch.cat([uncond.expand(per_class, -1, -1), cond.expand(per_class, -1, -1)])

        def predict(z, t):
            u, c = unet(torch.cat([z, z]), t, ctx).chunk(2)
            return u + guidance * (c - u)

        g = torch.Generator().manual_seed(seed + k)
        z_T = torch.randn(per_class, 4, 16, 16, generator=g)
        for step in ddim_sample(predict, z_T, ddim_timesteps(steps), ab, "v_prediction"):
            pass
        x = vae.decode(step["z_prev"] / vae_scale).clamp(-1, 1)                            # (per_class, 3, H, W)
        found = F.normalize(clip.image(((x + 1) / 2 - mean) / std)[0], dim=-1) @ classes_text[k]
        hits += int((found > threshold).sum())
        images += list(((x + 1) / 2).permute(0, 2, 3, 1).numpy())
    return images, hits / (len(names) * per_class)


QUICK = dict(vae_steps=40, clip_steps=40, train_steps=40)     # the tests and notebooks under test


def stage_is_built(folder, settings):
    """Whether `folder` holds a stage built with exactly these settings (toy_stage.json)."""
    path = os.path.join(folder, "toy_stage.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        built = json.load(f)
    if built != settings:
        log(f"{folder} was built with {built}; rebuilding it with {settings}")
    return built == settings


def mark_built(folder, settings):
    write_text_atomic(os.path.join(folder, "toy_stage.json"), json.dumps(settings))


def run_script(script, *flags):
    """Run train.py or eval.py as its own process (scripts do not import each other)."""
    cmd = [sys.executable, os.path.join(HERE, script), *flags]
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise SystemExit(f"toy: {' '.join(cmd)} failed with exit code {code} (its error is above)")


def build_world(out="out/toy", vae_steps=1500, clip_steps=600, train_steps=1600, prior_steps=0, seed=0, dtype=None):
    """Stages 1-3, each skipped when built with the same settings. prior_steps > 0: stage 2b, and
    DiGSeg fine-tunes the text-to-image U-Net instead of one from scratch. dtype: fp32 | bf16 of
    stage 3 (None: default_dtype()). Returns the DiGSeg checkpoint folder."""
    dtype = dtype or default_dtype()
    sd2_dir, clip_dir = build_bases(out, vae_steps, clip_steps)
    run_dir = os.path.join(out, "digseg")
    pretraining = pretraining_record(vae_steps, clip_steps, prior_steps)
    stage3 = {**pretraining, "train_steps": train_steps, "seed": seed, "dtype": dtype,
              "train.py": file_digest(os.path.join(HERE, "train.py"))[:16]}   # its toy preset changes too
    base = build_prior(out, sd2_dir, clip_dir, pretraining) if prior_steps else sd2_dir
    if not stage_is_built(run_dir, stage3):
        log(f"stage 3/4: fine-tuning DiGSeg from {'the text-to-image U-Net' if prior_steps else 'scratch'}: "
            f"python train.py --preset=toy --dtype={dtype}")
        run_script("train.py", "--preset=toy", f"--max_steps={train_steps}", f"--sd2={base}", f"--clip={clip_dir}",
                   f"--out_dir={run_dir}", f"--seed={seed}", f"--dtype={dtype}", "--overwrite=1")
        mark_built(run_dir, stage3)
    return os.path.join(run_dir, "checkpoint")


def build_bases(out, vae_steps, clip_steps):
    """Stages 1 (the VAE) and 2 (CLIP), the pretrained pieces, in fp32: -> (SD2 folder, CLIP folder)."""
    sd2_dir, clip_dir = os.path.join(out, "sd2"), os.path.join(out, "clip")
    stage1, stage2 = {"vae_steps": vae_steps, "vae_batch": VAE_BATCH}, {"clip_steps": clip_steps}
    if not stage_is_built(sd2_dir, stage1):
        log("stage 1/4: pretraining the toy VAE on images and masks")
        vae, curve = pretrain_vae(vae_steps)
        unet = UNet2DCondition(TOY_UNET)          # from scratch; stage 2b (--prior=1) pretrains one
        save_sd2_folder(sd2_dir, unet, vae, prediction="v_prediction")
        line_plot(os.path.join(out, "vae_loss.png"), {"vae": (range(len(curve)), curve)}, title="toy VAE", logy=True)
        mark_built(sd2_dir, stage1)
    if not stage_is_built(clip_dir, stage2):
        log("stage 2/4: pretraining the toy CLIP (sigmoid image-text loss)")
        clip, vocab_dir, threshold = pretrain_clip(out, clip_steps)
        save_clip_folder(clip_dir, clip, vocab_dir)
        with open(os.path.join(clip_dir, "toy_threshold.txt"), "w") as f:   # for class proposals (App. A.3)
            f.write(f"{threshold}\n")
        mark_built(clip_dir, stage2)
    return sd2_dir, clip_dir


def pretraining_record(vae_steps, clip_steps, prior_steps):
    """The settings of stages 1, 2 and 2b: stage 2b's record, and part of stage 3's, so that a
    stage is rebuilt when one it is built on changes."""
    return {"vae_steps": vae_steps, "vae_batch": VAE_BATCH, "clip_steps": clip_steps, "prior_steps": prior_steps}


def build_prior(out, sd2_dir, clip_dir, settings):
    """Stage 2b: the text-to-image U-Net beside the toy VAE in <out>/sd2-prior (a diffusers SD2
    folder, so DiGSeg loads it through the real loader and widens its conv_in), with a PNG grid of
    its samples and the toy CLIP's hit rate. Trained in fp32; rebuilt on a new VAE or CLIP (they
    are in `settings`). Returns the folder."""
    prior_dir = os.path.join(out, "sd2-prior")
    if stage_is_built(prior_dir, settings):
        return prior_dir
    log("stage 2b: pretraining the toy U-Net as a text-to-image generator (the generative prior)")
    sd, clip = load_sd2(sd2_dir), load_clip(clip_dir)
    unet, proj, curve = pretrain_prior(sd.vae, sd.vae_scale, clip, settings["prior_steps"])
    save_sd2_folder(prior_dir, unet, sd.vae, prediction="v_prediction")
    with open(os.path.join(clip_dir, "toy_threshold.txt")) as f:
        threshold = float(f.read())
    images, hit_rate = prior_samples(unet, proj, sd.vae, sd.vae_scale, clip, threshold)
    per_class = len(images) // len(data.TOY_CLASSES)
    image_grid(os.path.join(out, "prior_samples.png"), images,
               [f"a {c}." for c in data.TOY_CLASSES for _ in range(per_class)], cols=per_class, cell=96)
    line_plot(os.path.join(out, "prior_loss.png"), {"text-to-image": (range(len(curve)), curve)},
              title="toy U-Net as a text-to-image model", logy=True)
    log(f"text-to-image check: the toy CLIP finds the asked class in {hit_rate:.0%} of the generated scenes "
        f"(grid: {out}/prior_samples.png)")
    write_text_atomic(os.path.join(prior_dir, "prior_check.json"), json.dumps({"clip_hit_rate": hit_rate}))
    mark_built(prior_dir, settings)
    return prior_dir


def ensure():
    """For the notebooks: the toy world of DIGSEG_TOY_OUT (default out/toy), built if missing; with
    DIGSEG_TOY_QUICK=1 (the test suite) in a few seconds with few steps."""
    out = os.environ.get("DIGSEG_TOY_OUT", "out/toy")
    return build_world(out, **(QUICK if os.environ.get("DIGSEG_TOY_QUICK") == "1" else {}))


def notebook_world(real=None):
    """What a notebook works on -> dict(checkpoint, sd2, clip, dataset, data_root, out).

    real=None: the toy world (`ensure`). Your own: real=dict(checkpoint=a trained DiGSeg folder,
    dataset=a key of data.DATASETS or "folder", data_root=its folder); the SD2 and CLIP weights are
    the ones its digseg.json names. Figures go to <the run's folder>/../notebooks/."""
    if real is None:
        ckpt, dataset, root = ensure(), "toy", ""
    else:
        ckpt, dataset, root = real["checkpoint"], real.get("dataset", "folder"), real.get("data_root", "data")
    cfg = DiGSeg.config_of(ckpt)
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "notebooks")
    os.makedirs(out, exist_ok=True)
    return dict(checkpoint=ckpt, sd2=cfg.sd2, clip=cfg.clip, dataset=dataset, data_root=root, out=out)


STUDY_SCENES = (50, 200, 1000, 20000)            # labelled training scenes: the paper's Fig. 6 fractions in small


# The prior study's table (docs/results.md) was measured with half of the samples at t = T-1, in
# fp32, on whole 64 px scenes; pinned here, so that its cached runs and new ones agree whatever
# the preset and the CPU say.
STUDY_T_MAX_SHARE = 0.5
STUDY_DTYPE = "fp32"
STUDY_SIZE = 64


def study_prior(out, args):
    """The paper's premise at toy scale: DiGSeg fine-tuned from the text-to-image U-Net ("prior")
    vs from scratch, at equal steps, on 50 / 200 / 1000 / all labelled scenes, 3 seeds each; and
    App. A.2's --trainable=paper vs all on both. Writes <out>/prior/results.json and mIoU.png."""
    sd2_dir, clip_dir = build_bases(out, args.vae_steps, args.clip_steps)   # command 1's world
    bases = {"scratch": sd2_dir,
             "prior": build_prior(out, sd2_dir, clip_dir,
                                  pretraining_record(args.vae_steps, args.clip_steps, args.prior_steps))}
    folder = os.path.join(out, "prior")

    def finetune(init, scenes_, seed, trainable="all"):
        run = os.path.join(folder, f"{init}-{scenes_}-{trainable}-seed{seed}")
        if not os.path.isfile(os.path.join(run, "eval", "metrics_main.json")):
            run_script("train.py", "--preset=toy", f"--sd2={bases[init]}", f"--clip={os.path.join(out, 'clip')}",
                       f"--max_steps={args.study_steps}", f"--fraction={scenes_ / 20000}", f"--seed={seed}",
                       f"--trainable={trainable}", f"--out_dir={run}", "--overwrite=1", "--log_every=1000",
                       f"--t_max_share={STUDY_T_MAX_SHARE}", f"--dtype={STUDY_DTYPE}", f"--size={STUDY_SIZE}")
            run_script("eval.py", f"--checkpoint={run}/checkpoint", "--dataset=toy", f"--limit={args.val_images}", "--proposals=0",
                       f"--out={run}/eval")
        with open(os.path.join(run, "eval", "metrics_main.json")) as f:
            return json.load(f)["miou_gt"]

    seeds = range(args.study_seeds)
    results = {"scenes": list(STUDY_SCENES), "steps": args.study_steps, "val_images": args.val_images}
    for init in ("scratch", "prior"):
        results[init] = [[finetune(init, n, seed) for seed in seeds] for n in STUDY_SCENES]
        log(f"{init}: " + ", ".join(f"{n} scenes {np.mean(r):.3f}" for n, r in zip(STUDY_SCENES, results[init])))
    results["paper_set"] = {init: [finetune(init, STUDY_SCENES[-1], seed, "paper") for seed in seeds]
                            for init in ("scratch", "prior")}
    write_text_atomic(os.path.join(folder, "results.json"), json.dumps(results, indent=2))
    series = {}
    for init in ("scratch", "prior"):
        runs = np.array(results[init])                  # (scenes, seeds)
        for what, values in (("mean", runs.mean(1)), ("worst seed", runs.min(1)), ("best seed", runs.max(1))):
            series[f"{init}: {what}"] = (np.log10(STUDY_SCENES).tolist(), values.tolist())
    line_plot(os.path.join(folder, "mIoU.png"), series, ylabel="toy val mIoU",
              xlabel="log10 of the labelled scenes (" + ", ".join(map(str, STUDY_SCENES)) + ")",
              title=f"scratch vs text-to-image prior, {args.study_steps} steps, {len(seeds)} seeds")
    log(f"paper set (App. A.2) on all scenes: scratch {results['paper_set']['scratch']}, "
        f"prior {results['paper_set']['prior']}; results in {folder}/results.json and mIoU.png")
    return results


# ---- beyond the paper: the e2e objective at toy scale (--study=e2e) ---------------------------------

E2E_STEP_COST = 1.35        # an e2e step / a diffusion step at the toy preset (bench.py --only=e2e; docs/results.md)
E2E_SCENES = (20000, 200)   # labelled training scenes: all of them, and few
# The rows: (name, what it is, train.py flags, base, share of the step budget, budgets). Each row runs
# at the study's step budget N ("steps"); the e2e and ontop rows also at the e2e steps that cost what
# N diffusion steps cost ("time": equal wall time, E2E_STEP_COST). "ontop" fine-tunes the preset's run
# of half the budget ("preset-half") end to end for the other half, Garcia et al.'s "E2E FT on top".
# Pixel MSE runs on all scenes only. "c1" is command 1's budget (train_steps diffusion steps, or the
# e2e steps that cost as much: "c1time"), on all scenes: the goal of an e2e toy val mIoU >= 0.85.
E2E_ROWS = [
    ("paper", "the paper's objective,\nuniform t", ["--t_max_share=0"], "scratch", 1.0, ("steps",)),
    ("preset", "the toy preset,\n3/4 at t = T-1", [], "scratch", 1.0, ("steps", "c1")),
    ("e2e", "e2e from scratch", ["--objective=e2e"], "scratch", 1.0, ("steps", "time", "c1time")),
    ("e2e-mse", "e2e, pixel MSE", ["--objective=e2e", "--mask_loss=mse"], "scratch", 1.0, ("steps",)),
    ("prior-e2e", "e2e from the\ntext-to-image prior", ["--objective=e2e"], "prior", 1.0, ("steps",)),
    ("ontop", "e2e on top of\nthe preset (1/2 + 1/2)", ["--objective=e2e"], "preset-half", 0.5, ("steps", "time")),
]


def study_e2e(out, args):
    """Beyond the paper, at toy scale: the e2e objective (digseg.e2e_loss) against the paper's, 3 seeds
    each, on all labelled scenes and on 200, at equal steps and at equal wall time; the error budget
    of the best of each kind (where the mIoU between them and the VAE's ceiling goes); overlays of
    each row's predictions. Runs study_jobs trainings at a time, one CPU thread each. Writes
    <out>/e2e/results.json, e2e.png, predictions.png and errors.json."""
    from concurrent.futures import ThreadPoolExecutor
    sd2_dir, clip_dir = build_bases(out, args.vae_steps, args.clip_steps)
    bases = {"scratch": sd2_dir, "prior": build_prior(out, sd2_dir, clip_dir,
                                                      pretraining_record(args.vae_steps, args.clip_steps, args.prior_steps))}
    folder, N = os.path.join(out, "e2e"), args.e2e_steps
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.study_jobs > 1 else None

    def run_dir(row, scenes, seed, budget):
        return os.path.join(folder, f"{row}-{budget}-{scenes}-seed{seed}")

    def finetune(job):
        row, flags, base, steps, scenes, seed, budget = job
        run = run_dir(row, scenes, seed, budget)
        if os.path.isfile(os.path.join(run, "eval", "metrics_main.json")):
            return
        init = [f"--init={run_dir('preset-half', scenes, seed, 'steps')}/checkpoint"] if base == "preset-half" else \
            [f"--sd2={bases[base]}"]
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "log.txt"), "w") as f:
            start = time.time()
            for script, argv in (("train.py", ["--preset=toy", *init, f"--clip={clip_dir}", f"--max_steps={steps}",
                                               f"--fraction={scenes / 20000}", f"--seed={seed}", f"--out_dir={run}",
                                               "--overwrite=1", "--log_every=200", "--dtype=fp32", *flags]),
                                 ("eval.py", [f"--checkpoint={run}/checkpoint", "--dataset=toy", "--proposals=0",
                                              f"--limit={args.val_images}", f"--out={run}/eval"])):
                if subprocess.run([sys.executable, os.path.join(HERE, script), *argv], env=env, stdout=f,
                                  stderr=subprocess.STDOUT).returncode != 0:
                    raise SystemExit(f"toy: {script} of {run} failed; its log: {run}/log.txt")
                if script == "train.py":
                    write_text_atomic(os.path.join(run, "train_seconds.txt"), f"{time.time() - start:.1f}\n")
        log(f"e2e study: {os.path.basename(run)} done")

    cells = [(scenes, seed) for scenes in E2E_SCENES for seed in range(args.study_seeds)]
    wave1 = [("preset-half", [], "scratch", N // 2, scenes, seed, "steps") for scenes, seed in cells]
    wave2 = []
    for row, _, flags, base, share, budgets in E2E_ROWS:
        for budget in budgets:
            steps = round((args.train_steps if budget.startswith("c1") else N) * share /
                          (E2E_STEP_COST if budget.endswith("time") else 1))
            jobs = [(row, flags, base, steps, scenes, seed, budget) for scenes, seed in cells
                    if scenes == E2E_SCENES[0] or (row != "e2e-mse" and not budget.startswith("c1"))]
            (wave2 if base == "preset-half" else wave1).extend(jobs)
    log(f"e2e study: {len(wave1) + len(wave2)} fine-tunings of {min(j[3] for j in wave1 + wave2)} to "
        f"{max(j[3] for j in wave1 + wave2)} steps, {args.study_jobs} at a time")
    for wave in (wave1, wave2):
        with ThreadPoolExecutor(args.study_jobs) as pool:
            list(pool.map(finetune, wave))

    def score(row, scenes, budget):
        runs = [run_dir(row, scenes, seed, budget) for seed in range(args.study_seeds)]
        if not os.path.isdir(runs[0]):
            return None
        miou = [json.load(open(os.path.join(r, "eval", "metrics_main.json")))["miou_gt"] for r in runs]
        seconds = [float(open(os.path.join(r, "train_seconds.txt")).read()) for r in runs]
        steps = json.load(open(os.path.join(runs[0], "checkpoint", "progress.json")))["step"]
        first = N // 2 if row == "ontop" else 0           # the preset's steps it started from
        return {"miou": miou, "mean": float(np.mean(miou)), "steps": steps + first, "steps_on_top": steps if first else None,
                "train_seconds": seconds}

    results = {"steps": N, "e2e_step_cost": E2E_STEP_COST, "val_images": args.val_images, "seeds": args.study_seeds,
               "rows": {f"{row}-{budget}": {str(n): score(row, n, budget) for n in E2E_SCENES}
                        for row, *_ in E2E_ROWS for budget in ("steps", "time", "c1", "c1time")}}
    results["rows"] = {k: v for k, v in results["rows"].items() if any(v.values())}
    best = {kind: max((k for k in results["rows"] if k.startswith(prefix)),
                      key=lambda k: results["rows"][k][str(E2E_SCENES[0])]["mean"])
            for kind, prefix in (("diffusion", ("paper", "preset")), ("e2e", ("e2e", "prior", "ontop")))}
    results["errors"] = {}
    for kind, key in best.items():                    # seed 0 of the best row of each kind, on all scenes
        row, budget = key.rsplit("-", 1)
        results["errors"][kind] = error_budget(os.path.join(run_dir(row, E2E_SCENES[0], 0, budget), "checkpoint"),
                                               args.val_images)
    results["errors"]["vae_ceiling"] = vae_ceiling(sd2_dir, args.val_images)
    write_text_atomic(os.path.join(folder, "results.json"), json.dumps(results, indent=2))
    e2e_figures(folder, results, run_dir)
    for key, row in results["rows"].items():
        log(f"{key:18s} " + "  ".join(f"{n} scenes: {row[str(n)]['mean']:.3f} ({', '.join(f'{m:.3f}' for m in row[str(n)]['miou'])}; "
                                      f"{row[str(n)]['steps']} steps)" for n in E2E_SCENES if row[str(n)]))
    log(f"results in {folder}/results.json, e2e.png, predictions.png")
    return results


def e2e_figures(folder, results, run_dir):
    """e2e.png: each row's mean mIoU (whiskers: worst and best seed) by labelled scenes; predictions.png:
    four validation scenes segmented by seed 0 of each row on all scenes, under the ground truth."""
    from plot import bar_plot, overlay
    keys = list(results["rows"])
    what = {row: text for row, text, *_ in E2E_ROWS}
    when = {"steps": "", "time": "\n(equal time)", "c1": "\n(command 1)", "c1time": "\n(command 1's time)"}
    labels = [what[k.rsplit("-", 1)[0]] + when[k.rsplit("-", 1)[1]] for k in keys]
    series = {}
    for n in E2E_SCENES:
        cells = [results["rows"][k][str(n)] for k in keys]
        series[f"{n} labelled scenes"] = [(c["mean"], min(c["miou"]), max(c["miou"])) if c else (float("nan"),) * 3
                                          for c in cells]
    bar_plot(os.path.join(folder, "e2e.png"), labels, series,
             title=f"toy val mIoU, E = 1, S = 1, {results['seeds']} seed{'s' * (results['seeds'] > 1)}; "
                   f"{results['steps']} steps, their time, or command 1's",
             ylabel="mIoU", size=(max(760, 110 * len(keys)), 440))
    val = data.build("toy", "", "val", evaluation=True)
    scenes = [val[i] for i in range(4)]
    tiles, names = [], list(data.TOY_CLASSES)
    shown = [k for k in keys if k.endswith("-steps")]
    for k in ["truth"] + shown:
        if k == "truth":
            tiles += [np.asarray(overlay(data.tensor_to_pil(x), y, names).resize((192, 128))) for x, y, _ in scenes]
            continue
        model = DiGSeg.from_checkpoint(os.path.join(run_dir(k.rsplit("-", 1)[0], E2E_SCENES[0], 0, "steps"),
                                                    "checkpoint")).eval()
        for x, _, _ in scenes:
            labels_ = aggregate_toy(model, x)
            tiles.append(np.asarray(overlay(data.tensor_to_pil(x), labels_, names).resize((192, 128))))
    image_grid(os.path.join(folder, "predictions.png"), tiles,
               [f"{k}" for k in ["ground truth"] + shown for _ in scenes], cols=len(scenes), cell=192)


def aggregate_toy(model, image, tau_bg=0.5):
    """The toy's labels of one scene, every class run (E = 1, S = 1)."""
    from digseg import aggregate
    return aggregate(model.segment(image, list(data.TOY_CLASSES), ensemble=1, steps=1), tau_bg)


@torch.no_grad()
def error_budget(ckpt, n, tau_bgs=(0.3, 0.4, 0.5, 0.6, 0.7)):
    """Where a checkpoint's mIoU goes, on the first n validation scenes, every class run (E = 1, S = 1):
    the mIoU at each background threshold tau_bg; with the classes absent from the ground truth
    removed (what false alarms on absent classes cost); per class IoU, precision and recall; and
    the pixels of the shapes split into found, missed (background) and taken for another class."""
    from digseg import aggregate
    from metrics import confusion_matrix, miou
    model, val = DiGSeg.from_checkpoint(ckpt).eval(), data.build("toy", "", "val", evaluation=True)
    C = len(data.TOY_CLASSES)
    cms = {t: 0 for t in tau_bgs}
    oracle = 0
    for i in range(min(n, len(val))):
        image, gt, _ = val[i]
        probs = model.segment(image, list(data.TOY_CLASSES), ensemble=1, steps=1)
        for t in tau_bgs:
            cms[t] = cms[t] + confusion_matrix(aggregate(probs, t), gt, C)
        present = torch.zeros(C, 1, 1)
        present[[c for c in gt.unique().tolist() if c >= 0]] = 1
        oracle = oracle + confusion_matrix(aggregate(probs * present, 0.5), gt, C)
    cm = cms[0.5].astype(float)
    shape_pixels = cm[:C].sum()
    return {"checkpoint": ckpt, "scenes": min(n, len(val)),
            "miou_by_tau_bg": {str(t): miou(cms[t])["miou_gt"] for t in tau_bgs},
            "miou_absent_classes_removed": miou(oracle)["miou_gt"],
            "per_class": {name: {"iou": float(miou(cms[0.5])["per_class"][c]),
                                 "precision": float(cm[c, c] / max(cm[:, c].sum(), 1)),
                                 "recall": float(cm[c, c] / max(cm[c].sum(), 1))} for c, name in enumerate(data.TOY_CLASSES)},
            "shape_pixels": {"found": float(np.trace(cm[:C, :C]) / shape_pixels),
                             "missed_as_background": float(cm[:C, C].sum() / shape_pixels),
                             "taken_for_another_class": float((cm[:C, :C].sum() - np.trace(cm[:C, :C])) / shape_pixels)},
            "background_taken_for_a_class": float(cm[C, :C].sum() / max(cm[C].sum(), 1))}


@torch.no_grad()
def vae_ceiling(sd2_dir, n):
    """The mIoU of the ground truth itself through the toy VAE, as inference sees masks: every class's
    mask (2y - 1) encoded and decoded, M_c its channel mean, aggregated at tau_bg = 0.5."""
    from digseg import aggregate, image_to_mask
    from metrics import confusion_matrix, miou
    sd, val, C = load_sd2(sd2_dir), data.build("toy", "", "val", evaluation=True), len(data.TOY_CLASSES)
    cm = 0
    for i in range(min(n, len(val))):
        _, gt, _ = val[i]
        masks = torch.stack([(gt == c).float() for c in range(C)])                 # (C, H, W)
        probs = image_to_mask(sd.vae.decode(sd.vae.encode(mask_to_image(masks))[0]))
        cm = cm + confusion_matrix(aggregate(probs, 0.5), gt, C)
    return {"scenes": min(n, len(val)), "miou": miou(cm)["miou_gt"]}


@torch.no_grad()
def readme_figure(ckpt, path, scenes=(7, 12)):
    """The README's picture (docs/toy.png): for validation scenes, the image, the ground truth, the
    starting noise z_T as the decoder sees it, the mask M_c after the one trailing DDIM step for one
    class of the scene, and the segmentation of every class (argmax, background below tau_bg)."""
    from digseg import prepare_image, size_multiple
    from plot import label_png
    model, val = DiGSeg.from_checkpoint(ckpt).eval(), data.build("toy", "", "val", evaluation=True)
    names, tiles, labels = list(data.TOY_CLASSES), [], []
    for i in scenes:
        image, gt, _ = val[i]
        c = int(gt[gt >= 0].mode().values)                                  # the scene's largest shape
        x = prepare_image(image, model.cfg.resolution, size_multiple(model.vae, model.unet))[0]
        z_x = model.encode_image(x)
        z_T = torch.randn(z_x.shape, generator=torch.Generator().manual_seed(0))
        step = next(model.denoise_steps(z_x, z_T, model.context([model.cfg.prompt_template.format(names[c])]), 1,
                                        "trailing"))
        pred = aggregate_toy(model, image)
        show = lambda labels_: np.asarray(label_png(labels_, len(names)).convert("RGB"))      # class colours, black
        tiles += [((image.permute(1, 2, 0) + 1) / 2).numpy(), show(gt), model.decode_mask(z_T)[0].numpy(),
                  model.decode_mask(step["z_prev"])[0].numpy(), show(pred)]
        labels += ["image", "ground truth: " + ", ".join(names[k] for k in gt.unique().tolist() if k >= 0),
                   "z_T ~ N(0, I), decoded", f"M_{names[c]} after 1 step", "prediction, 6 classes"]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image_grid(path, tiles, labels, cols=5, cell=160)
    log(f"wrote {path}")


@dataclass
class Settings:
    out: str = "out/toy"             # the world's folder: its stages, DiGSeg, the evaluation
    vae_steps: int = 1500            # stage 1: the toy VAE's steps
    clip_steps: int = 600            # stage 2: the toy CLIP's steps
    train_steps: int = 1600          # stage 3: DiGSeg's fine-tuning steps (train.py --preset=toy)
    prior: bool = False              # fine-tune the U-Net pretrained as a text-to-image model (stage 2b), not one from scratch
    prior_steps: int = 600           # stage 2b's steps (batch 32)
    val_images: int = 100            # validation scenes scored
    seed: int = 0                    # the fine-tuning seed (data order, classes, t and noise)
    dtype: str = "auto"              # of the fine-tuning; auto: bf16 on a GPU or on a CPU that computes it natively, else fp32
    study: str = ""                  # prior: scratch vs the text-to-image prior; e2e: the e2e objective (docs/results.md)
    study_steps: int = 600           # --study=prior: fine-tuning steps per run
    study_seeds: int = 3             # fine-tuning seeds per study cell
    figure: str = ""                 # write the README's picture of the toy world (docs/toy.png) from its checkpoint
    e2e_steps: int = 600             # --study=e2e: each row's step budget (equal steps; its e2e rows also at equal time)
    study_jobs: int = 1              # --study=e2e: fine-tunings at a time (more than one: one CPU thread each)
    debug: bool = False              # show the traceback of an error


CHOICES = {"dtype": ("auto", "fp32", "bf16"), "study": ("", "prior", "e2e")}
RANGES = {k: POSITIVE for k in ("vae_steps", "clip_steps", "train_steps", "prior_steps", "val_images", "study_steps",
                                "study_seeds", "e2e_steps", "study_jobs")}


def main(argv=None):
    args = parse_settings(Settings, sys.argv[1:] if argv is None else argv, __doc__, CHOICES, RANGES)
    args.dtype = default_dtype() if args.dtype == "auto" else args.dtype
    t_start = time.time()
    if args.study:
        (study_prior if args.study == "prior" else study_e2e)(args.out, args)
        log(f"study done in {(time.time() - t_start) / 60:.1f} min")
        return 0
    ckpt = build_world(args.out, args.vae_steps, args.clip_steps, args.train_steps, args.prior_steps * args.prior,
                       args.seed, args.dtype)
    log("stage 4/4: segmenting and evaluating the validation split (E = 1, S = 1, trailing): python eval.py")
    run_script("eval.py", f"--checkpoint={ckpt}", "--dataset=toy", f"--limit={args.val_images}", "--proposals=0", "--ensemble=1",
               "--steps=1", "--spacing=trailing", f"--out={args.out}/eval", "--overlays=8")
    with open(os.path.join(args.out, "eval", "metrics_main.json")) as f:
        scores = json.load(f)
    log(f"toy val mIoU {scores['miou_gt']:.4f} (E=1, S=1 trailing, {args.val_images} images) in "
        f"{(time.time() - t_start) / 60:.1f} min; overlays in {args.out}/eval/")
    if args.figure:
        readme_figure(ckpt, args.figure)
    log(f"next: python sample.py YOUR_IMAGES --checkpoint={ckpt} --classes=circle,square,triangle,star,ring,bar")
    return 0


if __name__ == "__main__":
    run(main)
