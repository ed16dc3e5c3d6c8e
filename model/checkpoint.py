"""The DiGSeg checkpoint format: one folder holding

    digseg.safetensors   the fine-tuned tensors only: what trains, and the widened conv_in
    digseg.json          the model's config (digseg.DiGSegConfig), the frozen base weights
                         (SD2, CLIP) named by absolute path, so it loads from any working directory

Both are written atomically (temporary file, fsync, rename). Reading is strict: every trained
tensor must be there, none may be unknown, each has the model's shape. Kept apart from digseg.py,
which holds the method; this file knows nothing of DiGSeg but its parameter names.
"""
import hashlib
import json
import os
from dataclasses import asdict

import torch

from model.files import WeightsError, read_state_dict, save_file_atomic, write_text_atomic

WEIGHTS, CONFIG = "digseg.safetensors", "digseg.json"
BASE_PATHS = (("sd2", "--sd2"), ("clip", "--clip"), ("clip_vocab", "--clip_vocab"))


def save(model, out_dir):
    """model.cfg (a dataclass) and the parameters with requires_grad, plus unet.conv_in.weight,
    which is always widened to 8 channels, into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    tensors["unet.conv_in.weight"] = model.unet.conv_in.weight.detach().contiguous()
    save_file_atomic(tensors, os.path.join(out_dir, WEIGHTS))
    cfg = asdict(model.cfg)
    for key, _ in BASE_PATHS:
        cfg[key] = os.path.abspath(cfg[key]) if cfg[key] else ""
    write_text_atomic(os.path.join(out_dir, CONFIG), json.dumps(cfg, indent=2))


def read_config(ckpt_dir, known, sd2=None, clip=None):
    """digseg.json as a dict of the `known` config keys, its base paths resolved: absolute as saved,
    or (older checkpoints) relative to the working directory or to the checkpoint folder.
    sd2=/clip= point at the base weights where they have moved."""
    path = os.path.join(ckpt_dir, CONFIG)
    if not os.path.isfile(path):
        raise WeightsError(f"{ckpt_dir}: not a DiGSeg checkpoint (expected {CONFIG} and {WEIGHTS})")
    with open(path) as f:
        saved = json.load(f)
    unknown = sorted(set(saved) - set(known))
    if unknown or "sd2" not in saved:
        raise WeightsError(f"{path}: " + (f"unknown keys {unknown}" if unknown else "no 'sd2' key") +
                           f"; a DiGSeg config has {', '.join(sorted(known))}")
    saved.update({k: v for k, v in (("sd2", sd2), ("clip", clip)) if v})
    for key, flag in BASE_PATHS:
        if saved.get(key):
            saved[key] = base_path(saved[key], ckpt_dir, f"{path} names {key}={saved[key]!r}, which does not "
                                   f"exist; if the weights moved, pass {flag}=NEW_PATH")
    return saved


def load_tuned(model, ckpt_dir):
    """Copy digseg.safetensors into a freshly built model, every tensor of it: a trained tensor
    missing from the file is an error, not a random weight."""
    path = os.path.join(ckpt_dir, WEIGHTS)
    tuned = read_state_dict(path)
    own = dict(model.named_parameters())
    unknown = sorted(set(tuned) - set(own))
    if unknown:
        raise WeightsError(f"{path}: keys that are not DiGSeg parameters: {unknown[:8]}")
    needed = {n for n, p in own.items() if p.requires_grad} | {"unet.conv_in.weight"}
    missing = sorted(needed - set(tuned))
    if missing:
        raise WeightsError(f"{path}: {len(missing)} trained tensors missing (trainable={model.cfg.trainable}): "
                           f"{missing[:8]}")
    with torch.no_grad():
        for n, v in tuned.items():
            if own[n].shape != v.shape:
                raise WeightsError(f"{path}: {n} has shape {tuple(v.shape)}, the model expects {tuple(own[n].shape)}")
            own[n].copy_(v)
    return model


def digest(ckpt_dir):
    """sha256 of digseg.json and digseg.safetensors: what a result computed from them depends on."""
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(os.path.join(ckpt_dir, name), "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def base_path(path, ckpt_dir, error):
    """A base-weights path from digseg.json: as it is if it exists (absolute, or relative to the
    working directory), else relative to the checkpoint folder."""
    for candidate in (path, os.path.join(ckpt_dir, path)):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise WeightsError(error)
