"""The toy world's pretrained pieces: a tiny VAE and a tiny CLIP (and, for --prior=1, the U-Net as a
text-to-image model), the same model classes as SD2 and CLIP in small configurations, trained on
the procedural scenes of data/toy.py. toyworld/world.py saves them in the formats the real loaders
read."""
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
from digseg import TextMLP, mask_to_image
from model.clip import CLIP, MEAN, STD, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, train_bpe
from model.diffusion import add_noise, ddim_sample, ddim_timesteps, scaled_linear_alphas_cumprod, velocity
from model.unet import PRESETS as UNET_PRESETS, UNet2DCondition
from model.vae import PRESETS as VAE_PRESETS, AutoencoderKL

# ---- the tiny models: same classes as SD2 and CLIP, small configurations -----------------------

TOY_VAE, TOY_UNET = VAE_PRESETS["toy"], UNET_PRESETS["toy"]     # 64 px -> 16 x 16 x 4 latent; a 2-level U-Net
TOY_CLIP_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=77, hidden_act="quick_gelu")
TOY_CLIP_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       image_size=64, patch_size=8, hidden_act="quick_gelu")
VAE_BATCH = 16              # stage 1's batch of 32 px crops (batch 32 is no better: docs/results.md)
TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a {} shape.", "the {}.")

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
        z0 = ddim_sample(predict, z_T, ddim_timesteps(steps), ab, "v_prediction")
        x = vae.decode(z0 / vae_scale).clamp(-1, 1)                            # (per_class, 3, H, W)
        found = F.normalize(clip.image(((x + 1) / 2 - mean) / std)[0], dim=-1) @ classes_text[k]
        hits += int((found > threshold).sum())
        images += list(((x + 1) / 2).permute(0, 2, 3, 1).numpy())
    return images, hits / (len(names) * per_class)
