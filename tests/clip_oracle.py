"""Helpers for the CLIP tests: random HF models saved by transformers, an OpenAI-format writer, and
openai/CLIP's own model.py (as shipped in the clip-anytorch wheel) as the independent reader of it."""
import dataclasses
import importlib.util
import os
import warnings

import torch
import torch.nn as nn


def hf_config(cfg):
    import transformers
    if cfg.vision_config is None:
        return transformers.CLIPTextConfig(**dataclasses.asdict(cfg.text_config), projection_dim=cfg.projection_dim)
    return transformers.CLIPConfig(text_config=dataclasses.asdict(cfg.text_config),
                                   vision_config=dataclasses.asdict(cfg.vision_config), projection_dim=cfg.projection_dim)


def openai_state_dict(hf_sd):
    """HF CLIPModel weights -> OpenAI names, written from openai/CLIP's model.py naming (FACTS.md 4):
    q/k/v fused into in_proj (rows q | k | v), projections stored [in, out]."""
    out = {}
    for tower, src, dst in (("text", "text_model.encoder.layers.", "transformer.resblocks."),
                            ("vision", "vision_model.encoder.layers.", "visual.transformer.resblocks.")):
        n = 0
        while f"{src}{n}.layer_norm1.weight" in hf_sd:
            s, d = f"{src}{n}.", f"{dst}{n}."
            for kind in ("weight", "bias"):
                out[d + f"attn.in_proj_{kind}"] = torch.cat([hf_sd[s + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
                for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[d + f"{a}.{kind}"] = hf_sd[s + f"{b}.{kind}"]
            n += 1
    out["token_embedding.weight"] = hf_sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf_sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = hf_sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = hf_sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = hf_sd["text_projection.weight"].t().contiguous()
    out["visual.conv1.weight"] = hf_sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = hf_sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf_sd["vision_model.embeddings.position_embedding.weight"]
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"visual.{a}.{kind}"] = hf_sd[f"vision_model.{b}.{kind}"]
    out["visual.proj"] = hf_sd["visual_projection.weight"].t().contiguous()
    out["logit_scale"] = hf_sd["logit_scale"]
    return out


class _Box(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(sd, path):
    """A TorchScript archive holding `sd` under its dotted names, like OpenAI's ViT-*.pt files."""
    root = _Box()
    for name, t in sd.items():
        *parts, leaf = name.split(".")
        m = root
        for p in parts:
            if not hasattr(m, p):
                m.add_module(p, _Box())
            m = getattr(m, p)
        m.register_parameter(leaf, nn.Parameter(t.clone(), requires_grad=False))
    torch.jit.save(torch.jit.script(root), path)


def openai_clip_model():
    """openai/CLIP's clip/model.py from the clip-anytorch wheel, loaded as a file: the package's
    __init__ needs torchvision, model.py only torch and numpy. None when the wheel is missing."""
    spec = importlib.util.find_spec("clip")
    path = os.path.join(os.path.dirname(spec.origin), "model.py") if spec and spec.origin else ""
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_openai_jit(model, ids, pixels, path):
    """A TorchScript archive made the way OpenAI's ViT-*.pt files were: openai/CLIP's model, traced,
    with input_resolution/context_length/vocab_size as buffers, weights in fp16."""
    for name, value in (("input_resolution", model.visual.input_resolution), ("context_length", ids.shape[1]),
                        ("vocab_size", model.vocab_size)):
        model.__dict__.pop(name, None)          # plain ints in model.py; tensors in the released files
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # shape checks inside nn.MultiheadAttention
        traced = torch.jit.trace_module(model, {"forward": (pixels, ids), "encode_text": ids,
                                                "encode_image": pixels}, check_trace=False)
    torch.jit.save(traced.half(), path)
