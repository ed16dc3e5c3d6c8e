"""The studies' results file: one JSON line per finished cell, kept in the repository
(docs/study_cells.jsonl), so that a study too long for one sitting is carried on by whoever runs it
next. A cell is one fine-tuning and its evaluation: (study, cell, seed) under given settings. A
rerun skips the cells already in the file, whatever commit wrote them; each line names its commit
and machine, so a figure made from the file says where it comes from. Start a new file
(--study_cells=PATH) when a change of the code should not be mixed with older cells."""
import json
import os
import platform
import subprocess
import threading
import time

from launch import cpu_has_native_bf16


def machine():
    """What ran a cell: the CPU's model name, its cores and whether it computes bf16 natively."""
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        name = names[0] if names else name
    return f"{name}, {os.cpu_count()} cores, {'native bf16' if cpu_has_native_bf16() else 'no native bf16'}"


def commit(root):
    """The checkout's commit, with "-dirty" when tracked files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


class Cells:
    """The finished cells of a results file, and the way to add one (appended, one line, flushed to
    disk before it counts, under a lock: several fine-tunings may finish at once)."""

    def __init__(self, path, root):
        self.path, self.root, self.lock = path, root, threading.Lock()
        self.done = {}
        if os.path.isfile(path):
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        self.done[self.key(rec["study"], rec["cell"], rec["seed"], rec["settings"])] = rec
                    except (ValueError, KeyError) as e:
                        raise ValueError(f"{path}:{n}: not a study cell ({e}); expected one JSON object per line "
                                         f"with study, cell, seed and settings") from None

    @staticmethod
    def key(study, cell, seed, settings):
        return study, cell, int(seed), json.dumps(settings, sort_keys=True)

    def get(self, study, cell, seed, settings):
        """The record of a finished cell, or None."""
        return self.done.get(self.key(study, cell, seed, settings))

    def add(self, study, cell, seed, settings, **results):
        """Append a finished cell: its results, the commit, the machine and the date."""
        rec = {"study": study, "cell": cell, "seed": int(seed), "settings": settings, **results,
               "commit": commit(self.root), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
        with self.lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.done[self.key(study, cell, seed, settings)] = rec
        return rec
