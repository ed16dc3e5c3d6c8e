"""Every notebook runs top to bottom without an error, on a quick toy world (DIGSEG_TOY_QUICK=1)."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    from toyworld.world import QUICK, build_world
    out = str(tmp_path_factory.mktemp("toy"))
    build_world(out, **QUICK)
    saved = {k: os.environ.get(k) for k in ("DIGSEG_TOY_OUT", "DIGSEG_TOY_QUICK")}
    os.environ.update(DIGSEG_TOY_OUT=out, DIGSEG_TOY_QUICK="1")
    yield out
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_there_are_five_notebooks_committed_without_outputs():
    assert len(NOTEBOOKS) == 5
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, quick_world):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images or "mIoU" in text, f"{os.path.basename(path)} showed nothing"
