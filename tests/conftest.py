"""Shared fixtures: tiny random models saved in the real formats, loaded through the real loaders."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_tiny_world(folder, seed=0, levels=2):
    """A tiny SD2 diffusers folder and a tiny HF CLIP folder with a BPE vocabulary -> their paths.
    levels=3: a U-Net with cross-attention at two levels (as SD2 has it at three), so that App. A.2's
    text_scales="paper" skips some of it."""
    from model.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, train_bpe
    from model.unet import UNet2DCondition, UNetConfig
    from model.vae import AutoencoderKL, VAEConfig
    from model.weights import save_clip_folder, save_sd2_folder
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=0.5))
    cross = levels - 1                                      # the deepest level has no cross-attention
    unet = UNet2DCondition(UNetConfig(block_out_channels=(16, 32, 32)[:levels], layers_per_block=1,
                                      heads=(1, 2, 2)[:levels],
                                      down_block_types=("CrossAttnDownBlock2D",) * cross + ("DownBlock2D",),
                                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross,
                                      cross_attention_dim=32, norm_num_groups=8))
    save_sd2_folder(os.path.join(folder, "sd2"), unet, vae)
    words = ["a photo of a circle.", "a photo of a square.", "a photo of a star.", "a ring", "a bar", "a triangle"]
    tok = train_bpe(words * 5, 300, os.path.join(folder, "bpe"))
    cfg = CLIPConfig(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=2, eos_token_id=tok.eot),
                     CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=32, patch_size=8), projection_dim=16)
    save_clip_folder(os.path.join(folder, "clip"), CLIP(cfg), os.path.join(folder, "bpe"))
    return os.path.join(folder, "sd2"), os.path.join(folder, "clip")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return make_tiny_world(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_model(tiny_paths):
    from digseg import DiGSeg
    torch.manual_seed(0)
    return DiGSeg.from_weights(*tiny_paths, trainable="all", resolution=32).eval()
