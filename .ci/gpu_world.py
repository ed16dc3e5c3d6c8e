"""Real-shape weights and data for checks on a GPU machine (no internet there): SD2-base (U-Net +
VAE, diffusers folder) and CLIP ViT-L/14 (HF folder) with random weights, written by the project's
own writers, and a `folder` dataset of random "photos" with 4-class label maps.

    python .ci/gpu_world.py OUT_DIR [BPE_GZ]    # BPE_GZ: bpe_simple_vocab_16e6.txt.gz (open_clip's wheel)
    python .ci/gpu_world.py OUT_DIR --tiny      # the toy's shapes and a small BPE built here (the CPU dry run)

Without BPE_GZ the vocabulary is trained here on the dataset's class prompts (model.clip.train_bpe):
the weights are random anyway, so only the tokenizer's format and CLIP's real shapes matter.
"""
import json
import os
import sys
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.clip import (CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PRESETS as CLIPS,  # noqa: E402
                        Tokenizer, read_openai_merges, train_bpe)
from model.unet import PRESETS as UNETS, UNet2DCondition                        # noqa: E402
from model.vae import PRESETS as VAES, AutoencoderKL                            # noqa: E402
from model.weights import save_clip_folder, save_sd2_folder                     # noqa: E402


def main(out, bpe_gz=None, tiny=False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        unet, vae = UNet2DCondition(UNETS["toy" if tiny else "sd2-base"]), AutoencoderKL(VAES["toy" if tiny else "sd2-base"])
    save_sd2_folder(os.path.join(out, "sd2"), unet, vae)
    vocab_dir = os.path.join(out, "vocab")
    if bpe_gz:                                              # the OpenAI merges as HF's vocab.json + merges.txt
        os.makedirs(vocab_dir, exist_ok=True)
        merges = read_openai_merges(bpe_gz)
        with open(os.path.join(vocab_dir, "vocab.json"), "w") as f:
            json.dump(Tokenizer.from_openai(bpe_gz).tok.get_vocab(), f)
        with open(os.path.join(vocab_dir, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        tok = Tokenizer.from_openai(bpe_gz)
    else:
        words = [f"a photo of a {c}." for c in CLASSES] + [f"A photo of a {c}." for c in CLASSES] + ["cat", "class"]
        tok = train_bpe(words * 5, 400, vocab_dir)
    if tiny:
        config = CLIPConfig(CLIPTextConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eot, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4),
                            CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8), projection_dim=32)
    else:
        config = replace(CLIPS["clip-vit-l14"], text_config=replace(CLIPS["clip-vit-l14"].text_config,
                                                                     vocab_size=tok.vocab_size, eos_token_id=tok.eot))
    with torch.device(device):
        clip = CLIP(config)
    save_clip_folder(os.path.join(out, "clip"), clip, vocab_dir)
    rng = np.random.default_rng(0)
    data = os.path.join(out, "data")
    with open(os.path.join(os.makedirs(data, exist_ok=True) or data, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in CLASSES))
    scale = 8 if tiny else 1
    for split, n in (("train", 32 if tiny else 320), ("val", 8 if tiny else 16)):   # several batches of 16 per epoch
        for d in ("images", "masks"):
            os.makedirs(os.path.join(data, d, split), exist_ok=True)
        for i in range(n):
            h, w = (480 // scale, 640 // scale) if i % 2 else (640 // scale, 480 // scale)
            label = np.zeros((h, w), np.uint8)
            label[h // 3:, :] = 2
            label[h // 2:h // 2 + 60 // scale, w // 4:w // 4 + 120 // scale] = 3
            label[:h // 3, : w // 3] = 1
            pixels = rng.random((h, w, 3)) * 60 + label[..., None] * 50
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(data, "images", split, f"{i:03d}.jpg"))
            Image.fromarray(label).save(os.path.join(data, "masks", split, f"{i:03d}.png"))


CLASSES = ("sky", "tree", "road", "car")

if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], next((a for a in args[1:] if not a.startswith("--")), None), "--tiny" in args)
