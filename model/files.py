"""Tensor files in and out: reading a state dict safely, strict key checks, atomic writes.

- read a state dict from .safetensors (preferred; memory-mapped, no extra copy) or from a
  pickle (.bin/.ckpt/.pt) with `torch.load(weights_only=True)`, so untrusted files cannot
  run code;
- check keys strictly and say which keys are missing, unexpected, or of the wrong shape;
- write through a temporary file and a rename, so a crash never leaves half a file.
"""
import hashlib
import os
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file and why."""


def read_state_dict(path):
    """Read a flat {name: tensor} dict from a .safetensors or a pickled torch file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"{path}: the file is empty")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle, zip and unpickler errors all mean the same thing here
        raise WeightsError(f"{path}: not a readable torch checkpoint (truncated, corrupt, or it holds "
                           f"code rather than tensors, which weights_only=True refuses): {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # original LDM .ckpt files: {"state_dict": ..., "global_step": ...}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def check_keys(module, state_dict, where):
    """Raise a WeightsError naming every missing/unexpected key and every shape mismatch."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {_listing(wrong)}")
    if problems:
        raise WeightsError(f"{where}: " + "; ".join(problems))


def load_into(module, state_dict, where, dtype=torch.float32, device="cpu"):
    """Strictly load `state_dict` into `module` (usually built on meta) and move it to dtype/device."""
    check_keys(module, state_dict, where)
    state_dict = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.to(device=device).eval()


def write_atomic(path, write):
    """Write a file so that a crash never leaves a half-written file under `path`: write(tmp) to a
    temporary name in the same folder, fsync, then rename over the target."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_file_atomic(tensors, path, metadata=None):
    """A safetensors file, written atomically."""
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def file_digest(path):
    """The sha256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_text_atomic(path, text):
    """A text file (JSON, say), written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def torch_save_atomic(obj, path):
    """torch.save, written atomically. Read it back with torch.load(..., weights_only=True)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _listing(names, limit=12):
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---- Stable Diffusion 2
