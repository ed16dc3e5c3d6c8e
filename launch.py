"""How a script starts: flags, device and dtype, torchrun processes, and one-line errors.

Shared by train.py, eval.py, sample.py and toy.py, which never import each other.

    settings = parse_settings(Settings, argv, choices=CHOICES, presets=PRESETS)   # --key=value flags
    procs = start_processes("auto")      # DDP from the torchrun environment (RANK, WORLD_SIZE, ...)
    ...
    stop_processes(procs)
    if __name__ == "__main__": run(main)  # a mistake prints one line (exit 2), not a traceback

Set --debug=1 or DIGSEG_DEBUG=1 to see the traceback of an error.
"""
import argparse
import inspect
import os
import sys
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class UsageError(ValueError):
    """A flag, path or setting the user gave is wrong; the message says which and what to do."""


# ---- flags from a dataclass ---------------------------------------------------------------------

def field_comments(cls):
    """{field: the comment on its line} from the dataclass source: the help of every flag."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        code, _, comment = line.strip().partition("  # ")
        if ":" in code and "=" in code and not code.startswith(("@", "class", "#")):
            comments[code.split(":")[0].strip()] = comment.strip()
    return comments


def settings_help(cls, choices, presets, doc):
    """--help text generated from the dataclass: flag, type, default, allowed values, comment."""
    comments = field_comments(cls)
    lines = [doc.strip(), "", "Settings (--key=value):"]
    for f in fields(cls):
        allowed = f" [{' | '.join(choices[f.name])}]" if f.name in choices else ""
        lines.append(f"  --{f.name}={f.default!r} ({_type(f).__name__}){allowed}  {comments.get(f.name, '')}".rstrip())
    lines.append(f"\nPresets (--preset=NAME, then overrides): {', '.join(presets)}")
    return "\n".join(lines)


def _type(f):
    return {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type


def parse_value(name, text, typ, choices=None):
    """One --name=text typed and checked: bools take 1/0, true/false, yes/no, on/off; nothing else."""
    if typ is bool:
        if text.lower() not in TRUE + FALSE:
            raise UsageError(f"--{name}={text}: expected a yes/no value ({', '.join(TRUE)} or {', '.join(FALSE)})")
        value = text.lower() in TRUE
    elif typ in (int, float):
        try:
            value = typ(text)
        except ValueError:
            raise UsageError(f"--{name}={text}: expected {'an integer' if typ is int else 'a number'}") from None
    else:
        value = text
    check_choice(name, value, choices)
    return value


def check_choice(name, value, choices):
    if name == "dataset" and isinstance(value, str) and "+" in value:    # merged training sets: each part
        for part in value.split("+"):
            check_choice(name, part, choices)
        return
    if choices and value not in choices and not (name == "device" and _is_cuda_index(value)):
        raise UsageError(f"--{name}={value}: expected one of {', '.join(map(str, choices))}")


def _is_cuda_index(value):
    return isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()


def split_flags(argv):
    """['--a=1', '--b=x'] -> {'a': '1', 'b': 'x'}; anything else is a usage error."""
    kv = {}
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            raise UsageError(f"arguments look like --key=value, got {a!r} (see --help)")
        k, v = a[2:].split("=", 1)
        kv[k] = v
    return kv


def apply_flags(settings, kv, choices):
    """Set each --key=value on a dataclass instance, typed and checked by the dataclass fields."""
    types = {f.name: _type(f) for f in fields(settings)}
    for k, v in kv.items():
        if k not in types:
            raise UsageError(f"unknown setting --{k}; valid: {', '.join(types)} (see --help)")
        setattr(settings, k, parse_value(k, v, types[k], choices.get(k)))
    for f in fields(settings):                       # presets and saved settings are checked too
        check_choice(f.name, getattr(settings, f.name), choices.get(f.name))
    return settings


def positive_int(text):
    """An argparse type: an integer >= 1 (ensemble sizes, steps, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def wants_help(argv):
    return any(a in ("-h", "--help") for a in argv)


# ---- devices and processes -----------------------------------------------------------------------

@dataclass
class Processes:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def ddp(self):
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (the avx512_bf16 or amx_bf16 flag of Linux's
    /proc/cpuinfo). Elsewhere torch emulates bf16 on the CPU, up to ~400x slower than fp32, so
    CPU bf16 is only worth choosing where this is True (no /proc/cpuinfo: False)."""
    if not os.path.exists("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_device(name, local_rank=0):
    """auto | cpu | cuda | cuda:N -> torch.device; cuda on a machine without it is a usage error."""
    if name not in ("auto", "cpu", "cuda") and not _is_cuda_index(name):
        raise UsageError(f"--device={name}: expected auto, cpu, cuda or cuda:N")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device={name}: this torch build or machine has no CUDA "
                         f"(torch {torch.__version__}); use --device=cpu or install a CUDA build of torch")
    return torch.device(name if _is_cuda_index(name) else f"cuda:{local_rank}")


def start_processes(device="auto"):
    """One process, or torchrun's (WORLD_SIZE > 1): NCCL on CUDA, gloo on the CPU. Each process
    takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Processes(dist.get_rank() if world > 1 else 0, world, local_rank, dev)


def stop_processes(procs):
    if procs.ddp:
        dist.barrier()                  # every rank done (rank 0 writes last) before tearing down
        dist.destroy_process_group()


def all_reduce_sum(*arrays):
    """Sum numpy arrays over the ranks (no-op in one process)."""
    if not dist.is_initialized():
        return arrays
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        out.append(t.cpu().numpy())
    return out


# ---- errors ----------------------------------------------------------------------------------------

def run(main):
    """Call main(sys.argv[1:]) and exit with its code. A user's mistake (a bad flag, a missing or
    wrong file: UsageError, WeightsError, DataError, ValueError, OSError) prints one line to stderr
    and exits 2; --debug=1 or DIGSEG_DEBUG=1 shows the traceback instead."""
    argv = sys.argv[1:]
    debug = os.environ.get("DIGSEG_DEBUG") == "1" or any(a.lower() in (f"--debug={t}" for t in TRUE) for a in argv)
    try:
        code = main(argv)
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(f"error: {e}  (--debug=1 shows the traceback)", file=sys.stderr)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)

