"""The notebooks: each runs top to bottom in small mode (any error fails), draws its figures,
and is exactly what ``notebooks/build.py`` makes of its source, without outputs.

With LOWRANK_EXECUTED_NOTEBOOKS=DIR (scripts/test.sh sets it) each notebook that passes is
written there executed, and the docs build that follows renders those instead of running the
notebooks a second time (docs/conf.py)."""

import importlib.util
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

_spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# Figures each notebook must draw (plt.show() calls): a silently empty plot cell fails.
FIGURES = {"01_quickstart": 1, "02_quantization": 3, "03_subspaces": 3, "04_results": 2}


class ThisInterpreter(KernelSpecManager):
    """Every kernel name runs this interpreter (the venv's), so no kernel needs registering
    and a kernel installed elsewhere on the machine is never picked up instead."""

    def get_kernel_spec(self, kernel_name):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                "{connection_file}"],
                          display_name=f"lowrank tests ({kernel_name})", language="python")


def execute(nb, timeout=300):
    km = KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())
    client = NotebookClient(nb, km=km, timeout=timeout,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    return client.execute()


def _texts(cells) -> str:
    """The printed text of the code cells among ``cells``."""
    return "".join(o.get("text", "") for cell in cells if cell.cell_type == "code"
                   for o in cell.outputs)


@pytest.mark.parametrize("name", build.NAMES)
def test_notebook_runs_top_to_bottom_in_small_mode(name, monkeypatch):
    monkeypatch.setenv("LOWRANK_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
    monkeypatch.delenv("LOWRANK_RESULTS", raising=False)  # the committed results
    nb = execute(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4))
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert "small mode: True" in _texts(code[:1])  # the first cell read the variable
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == FIGURES[name]
    if os.environ.get("LOWRANK_EXECUTED_NOTEBOOKS"):
        executed = Path(os.environ["LOWRANK_EXECUTED_NOTEBOOKS"])
        executed.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, executed / f"{name}.ipynb")


@pytest.mark.slow
def test_results_notebook_makes_its_own_rows_when_asked_or_names_a_missing_file(monkeypatch,
                                                                                tmp_path):
    monkeypatch.setenv("LOWRANK_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("LOWRANK_RESULTS", "tiny")
    nb = execute(nbformat.read(NOTEBOOKS / "04_results.ipynb", as_version=4))
    assert "4 finished runs from" in _texts(nb.cells)
    missing = tmp_path / "nowhere.sqlite"
    monkeypatch.setenv("LOWRANK_RESULTS", str(missing))
    with pytest.raises(CellExecutionError, match=f"LOWRANK_RESULTS={missing} is not a file"):
        execute(nbformat.read(NOTEBOOKS / "04_results.ipynb", as_version=4))


def test_a_failing_cell_fails_the_run():
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": build.KERNELSPEC})
    nb.cells = [nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("assert x == 2, 'x is not 2'"),
                nbformat.v4.new_code_cell("print('unreached')")]
    with pytest.raises(CellExecutionError, match="x is not 2"):
        execute(nb, timeout=60)


def test_committed_notebooks_are_built_from_their_sources_without_outputs():
    assert build.main(["--check"]) == 0
    for name in build.NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code)
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
        assert "LOWRANK_NOTEBOOK_SMALL" in code[0].source  # small mode is read first


def test_sources_parse_into_cells_and_bad_sources_are_named():
    cells = build.parse_cells('"""Doc."""\n# %% [md]\n# # T\n#\n# Text.\n# %%\nx = 1\n\n# %%\ny\n')
    assert cells == [("markdown", "# T\n\nText."), ("code", "x = 1"), ("code", "y")]
    with pytest.raises(ValueError, match=r"s\.py:2: unknown cell marker '# %% \[raw\]'"):
        build.parse_cells("# %%\n# %% [raw]\n", "s.py")
    with pytest.raises(ValueError, match="s.py:2: a Markdown cell holds only '# ' comment"):
        build.parse_cells("# %% [md]\nx = 1\n", "s.py")
    with pytest.raises(ValueError, match="s.py has no cells"):
        build.parse_cells("x = 1\n", "s.py")
    with pytest.raises(ValueError, match="s.py: cell 1 is empty"):
        build.parse_cells("# %%\nx = 1\n# %%\n\n", "s.py")
    with pytest.raises(ValueError, match="unknown notebook 'nope'; accepted"):
        build.build("nope")
