"""The notebooks ship executed, so that GitHub shows their pictures (`python .ci/run_notebooks.py`
writes them, on command 1's toy world); the suite runs each one again on a quick toy world
(DIGSEG_TOY_QUICK=1) and fails where what was shipped is stale in a way that matters: a shipped
error, a cell never run, or a picture the code no longer draws, or draws where none was shipped."""
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


def pictures(nb):
    """The indices of the code cells that show a PNG."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    return [i for i, c in enumerate(code) if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def test_there_are_five_notebooks_shipped_executed_with_their_pictures():
    assert len(NOTEBOOKS) == 5
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        name = os.path.basename(path)
        assert all(c.get("execution_count") for c in code), f"{name}: a code cell was never run"
        counts = [c["execution_count"] for c in code]
        assert counts == sorted(counts), f"{name}: its cells were not run top to bottom in one go"
        errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: ships an error: {errors[0].get('ename')}"
        assert pictures(nb), f"{name}: ships no picture"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_draws_what_it_ships(path, quick_world):
    shipped = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    assert pictures(nb) == pictures(shipped), (f"{os.path.basename(path)}: the code cells that draw are now "
                                               f"{pictures(nb)}, the shipped ones {pictures(shipped)}: "
                                               f"rerun python .ci/run_notebooks.py")
