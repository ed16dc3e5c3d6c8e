"""How a script starts and where a run lives: settings, device and dtype, torchrun processes, one-line
errors, and the run folder of train.py's checkpoints.

Shared by train.py, eval.py, sample.py, toy.py and bench.py, which never import each other.
Every script has one dataclass of settings; each field is a --key=value flag, typed by the field,
checked against the script's CHOICES and RANGES, and its comment (on the field's line, or on the
line in a base dataclass) is its --help text, so no help is written twice:

    settings = parse_settings(Settings, argv, __doc__, choices=CHOICES, ranges=RANGES)
    procs = start_processes("auto")      # DDP from the torchrun environment (RANK, WORLD_SIZE, ...)
    ...
    stop_processes(procs)
    if __name__ == "__main__": run(main)  # a mistake prints one line (exit 2), not a traceback

Set --debug=1 or DIGSEG_DEBUG=1 to see the traceback of an error.
"""
import dataclasses
import inspect
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from digseg import ENSEMBLE
from model import cuda
from model.files import torch_save_atomic, write_text_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
POSITIVE = (1, None)                     # a RANGES entry: an integer >= 1
SHARE = (0, 1)                           # a RANGES entry: a number in [0, 1]


class UsageError(ValueError):
    """A flag, path or setting the user gave is wrong; the message says which and what to do."""


# ---- settings from a dataclass ----------------------------------------------------------------

@dataclass
class Inference:
    """What segment() and the class proposals take: eval.py's and sample.py's shared settings."""
    checkpoint: str = ""             # a DiGSeg checkpoint folder (digseg.json + digseg.safetensors)
    sd2: str = ""                    # the SD2 base weights, where they moved since training
    clip: str = ""                   # the CLIP base weights, where they moved since training
    proposal_clip: str = ""          # another CLIP with a vision tower, for the proposals only (e.g. ViT-B/16, Table 1)
    clip_vocab: str = ""             # bpe_simple_vocab_16e6.txt.gz, for an OpenAI .pt proposal_clip
    ensemble: int = ENSEMBLE         # E, seeds averaged in latent space (Eq. 8); the paper: 8 "unless otherwise stated", main tables E x S = 8 x 2
    steps: int = 1                   # S, DDIM steps (Eq. 7); the paper's main tables: 2
    spacing: str = "trailing"        # DDIM timesteps (Sec. 4.3)
    eta: float = 0.0                 # Eq. 7's sigma_t: 0 = deterministic DDIM (the paper, Sec. 4.1)
    seed: int = 0                    # member e starts from the noise of seed + e
    batch_size: int = 8              # (class, member) pairs per U-Net call
    tau: float = 0.7                 # one class's binary mask is M_c > tau (the paper)
    tau_bg: float = 0.5              # background where the best class is below this (ours: the paper gives no value)
    tau_global: float = 0.25         # CLIP image-text cosine that proposes a class (App. A.3, the paper)
    tau_patch: float = 0.3           # CLIP best-patch cosine that proposes a class (ours)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    dtype: str = "fp32"              # the weights' dtype at inference
    debug: bool = False              # show the traceback of an error


INFERENCE_CHOICES = {"spacing": ("trailing", "leading", "linspace"), "dtype": tuple(DTYPES),
                     "device": ("auto", "cpu", "cuda")}
INFERENCE_RANGES = {"ensemble": POSITIVE, "steps": POSITIVE, "batch_size": POSITIVE}


def field_comments(cls):
    """{field: the comment on its line} from the source of the dataclass and of its dataclass bases
    (a subclass that redeclares a field without a comment keeps its base's): the help of every flag."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            code, _, comment = line.strip().partition("  # ")
            if ":" in code and "=" in code and not code.startswith(("@", "class ", "#")) and comment.strip():
                comments[code.split(":")[0].strip()] = comment.strip()
    return comments


def settings_help(cls, choices, presets, doc, ranges=None):
    """--help text generated from the dataclass: flag, type, default, allowed values, comment."""
    comments, ranges = field_comments(cls), ranges or {}
    lines = [doc.strip(), "", "Settings (--key=value):"]
    for f in fields(cls):
        allowed = f" [{' | '.join(map(str, choices[f.name]))}]" if f.name in choices else ""
        allowed += f" [{_range_text(ranges[f.name])}]" if f.name in ranges else ""
        default = f.default if f.default is not dataclasses.MISSING else []
        lines.append(f"  --{f.name}={default!r} ({_type(f).__name__}){allowed}  {comments.get(f.name, '')}".rstrip())
    if presets:
        lines.append(f"\nPresets (--preset=NAME, then overrides): {', '.join(presets)}")
    return "\n".join(lines)


def _type(f):
    return {"bool": bool, "int": int, "float": float, "str": str, "list": list}.get(f.type, f.type) \
        if isinstance(f.type, str) else f.type


def _range_text(bounds):
    low, high = bounds
    return f">= {low}" if high is None else f"in [{low}, {high}]"


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


def check_ranges(settings, ranges):
    """Each `ranges` entry (low, high or None) bounds its setting; outside, a UsageError names it."""
    for name, (low, high) in (ranges or {}).items():
        value = getattr(settings, name)
        if value < low or (high is not None and value > high):
            what = "an integer" if isinstance(value, int) else "a number"
            raise UsageError(f"--{name}={value}: expected {what} {_range_text((low, high))}")
    return settings


def _is_cuda_index(value):
    return isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()


def split_flags(argv, positional=False):
    """['--a=1', '--b=x', 'img.png'] -> ({'a': '1', 'b': 'x'}, ['img.png']); an argument that is not
    --key=value is a usage error unless the script takes positional arguments."""
    kv, rest = {}, []
    for a in argv:
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            kv[k] = v
        elif positional and not a.startswith("--"):
            rest.append(a)
        else:
            raise UsageError(f"arguments look like --key=value, got {a!r} (see --help)")
    return kv, rest


def apply_flags(settings, kv, choices):
    """Set each --key=value on a dataclass instance, typed and checked by the dataclass fields."""
    types = {f.name: _type(f) for f in fields(settings) if _type(f) is not list}
    for k, v in kv.items():
        if k not in types:
            raise UsageError(f"unknown setting --{k}; valid: {', '.join(types)} (see --help)")
        setattr(settings, k, parse_value(k, v, types[k], choices.get(k)))
    for f in fields(settings):                       # presets and saved settings are checked too
        check_choice(f.name, getattr(settings, f.name), choices.get(f.name))
    return settings


def parse_settings(cls, argv, doc, choices=None, ranges=None, presets=None, positional=None):
    """argv -> a `cls` instance: [--preset=NAME first, then] --key=value flags over the defaults,
    typed, checked against `choices` and `ranges`. --help prints every setting with its comment.
    positional: the name of a list field that takes the arguments not of the --key=value form."""
    choices = choices or {}
    if wants_help(argv):
        print(settings_help(cls, choices, presets, doc, ranges))
        raise SystemExit(0)
    kv, rest = split_flags(argv, positional is not None)
    preset = kv.pop("preset", None) if presets else None
    if preset is not None and preset not in presets:
        raise UsageError(f"--preset={preset}: unknown preset; valid: {', '.join(presets)}")
    settings = apply_flags(cls(**(presets or {}).get(preset, {})), kv, choices)
    if positional:
        if not rest:
            raise UsageError(f"give the {positional} as arguments (see --help)")
        setattr(settings, positional, rest)
    return check_ranges(settings, ranges)


def wants_help(argv):
    return any(a in ("-h", "--help") for a in argv)


# ---- devices and processes -----------------------------------------------------------------------

@dataclass
class Processes:
    rank: int
    count: int                       # processes in all (torchrun's WORLD_SIZE)
    local_rank: int
    device: torch.device
    ddp: bool = False               # a process group, and the model wrapped in DDP

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
    """auto | cpu | cuda | cuda:N -> torch.device; cuda on a machine without it is a usage error,
    except under simulated CUDA (model/cuda.py), where it is the CPU taking the CUDA branches."""
    if name not in ("auto", "cpu", "cuda") and not _is_cuda_index(name):
        raise UsageError(f"--device={name}: expected auto, cpu, cuda or cuda:N")
    if name == "cpu" or (not torch.cuda.is_available() and (name == "auto" or cuda.simulated())):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device={name}: this torch build or machine has no CUDA "
                         f"(torch {torch.__version__}); use --device=cpu or install a CUDA build of torch")
    return torch.device(name if _is_cuda_index(name) else f"cuda:{local_rank}")


def start_processes(device="auto", force_ddp=False):
    """One process, or torchrun's (WORLD_SIZE > 1): NCCL on CUDA, gloo on the CPU. Each process
    takes the GPU of its LOCAL_RANK. force_ddp: a process group (and DDP) in one process too, under
    torchrun --nproc_per_node=1, so that the DDP path can be checked on a machine with one GPU."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if force_ddp and "MASTER_ADDR" not in os.environ:
        raise UsageError("--force_ddp=1 needs torchrun's environment: torchrun --nproc_per_node=1 train.py ...")
    ddp = count > 1 or force_ddp
    if ddp:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    cuda.set_device(dev)
    return Processes(dist.get_rank() if ddp else 0, count, local_rank, dev, ddp)


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


# ---- the run folder: train.py's checkpoints ------------------------------------------------------------------------------

def checkpoints(out_dir):
    """[(step, folder)] of the complete checkpoints in out_dir, oldest first."""
    found = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        folder = os.path.join(out_dir, name)
        if (name == "checkpoint" or name.startswith("checkpoint-")) and os.path.isfile(
                os.path.join(folder, "train_state.pt")):
            found.append((checkpoint_step(folder), folder))
    return sorted(found)


def checkpoint_step(folder):
    """The step of a checkpoint, from its progress.json (older checkpoints: from train_state.pt)."""
    if os.path.isfile(os.path.join(folder, "progress.json")):
        with open(os.path.join(folder, "progress.json")) as f:
            return json.load(f)["step"]
    return torch.load(os.path.join(folder, "train_state.pt"), map_location="cpu", weights_only=True)["step"]


def find_checkpoint(path):
    """A checkpoint folder, or a run's out_dir -> its newest checkpoint."""
    if os.path.isfile(os.path.join(path, "train_state.pt")):
        return os.path.normpath(path)
    found = checkpoints(path)
    if not found:
        raise UsageError(f"--resume={path}: neither a checkpoint folder (with train_state.pt) nor a run folder "
                         f"holding checkpoint/")
    return found[-1][1]


def save_checkpoint(out_dir, model, state, s):
    """Atomic: everything goes to checkpoint.tmp/ (each file fsynced); then the newest checkpoint/
    becomes checkpoint-<its step>/ and checkpoint.tmp/ becomes checkpoint/, by renames, so a crash
    at any moment leaves complete checkpoints. Keeps the newest `s.keep`."""
    tmp, final = os.path.join(out_dir, "checkpoint.tmp"), os.path.join(out_dir, "checkpoint")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)                                   # trainable weights (safetensors) + config (JSON)
    torch_save_atomic(state, os.path.join(tmp, "train_state.pt"))  # optimizer, scaler, RNG, data position
    write_text_atomic(os.path.join(tmp, "settings.json"), json.dumps(asdict(s), indent=2))
    write_text_atomic(os.path.join(tmp, "progress.json"), json.dumps(
        {"step": state["step"], "loss": state["losses"][-1][1] if state["losses"] else None}, indent=2))
    for step, folder in checkpoints(out_dir):
        if folder == final:
            os.replace(final, os.path.join(out_dir, f"checkpoint-{step:07d}"))
    os.replace(tmp, final)
    for _, folder in checkpoints(out_dir)[:-s.keep]:
        shutil.rmtree(folder)


def prepare_out_dir(s, resumed_from):
    """Refuse to overwrite a run by mistake: a fresh run into an out_dir with checkpoints, or a
    resume from an older checkpoint of a run that has newer ones (they would be replaced)."""
    elsewhere = (resumed_from is not None and
                 os.path.abspath(os.path.dirname(resumed_from[1])) != os.path.abspath(s.out_dir))
    later = [f for step, f in checkpoints(s.out_dir)                # all of them in another run's folder
             if resumed_from is None or elsewhere or step > resumed_from[0]]
    if later and not s.overwrite:
        what = "a fresh run" if resumed_from is None else f"resuming from step {resumed_from[0]}"
        raise UsageError(f"--out_dir={s.out_dir} holds checkpoints ({', '.join(map(os.path.basename, later))}) that "
                         f"{what} would replace; pass --overwrite=1 to replace them, or another --out_dir")
    for folder in later:
        shutil.rmtree(folder)
    os.makedirs(s.out_dir, exist_ok=True)
