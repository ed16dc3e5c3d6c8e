"""Execute the five notebooks in place, outputs kept, so that they ship with their pictures.

    python .ci/run_notebooks.py                # on the toy world of out/toy (DIGSEG_TOY_OUT), built if missing
    python .ci/run_notebooks.py 03_training    # some of them

The suite re-executes them on a quick world and fails when a shipped picture goes missing
(tests/test_notebooks.py); rerun this after a change to what a notebook draws. On 2 CPU cores with
command 1's world built, all five take about half an hour (notebook 5 trains its ablations).
"""
import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(names):
    if os.environ.get("DIGSEG_TOY_QUICK") == "1":
        raise SystemExit("run_notebooks.py: DIGSEG_TOY_QUICK=1 would ship the quick world's meaningless pictures; unset it")
    paths = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
    if names:
        paths = [p for p in paths if any(os.path.basename(p).startswith(n) for n in names)]
        if not paths:
            raise SystemExit(f"run_notebooks.py: no notebook starts with {', '.join(names)}")
    for path in paths:
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
        for cell in nb.cells:                                   # no per-run noise in the diff
            cell.get("metadata", {}).pop("execution", None)
        tmp = path + ".tmp"
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        print(f"{os.path.basename(path)}: executed in {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
