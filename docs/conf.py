"""Sphinx configuration of lowrank's documentation (built by ``bash scripts/docs.sh``).

Offline by design: no intersphinx, so references to other projects (jax, flax, numpy) are not
checked; every reference into ``lowrank`` must resolve (``nitpicky``, warnings are errors).
The API pages are generated from the packages' ``__all__`` (``docs/apigen.py``) and the
notebooks are copied from ``notebooks/`` and executed (in small mode, set by scripts/docs.sh),
unless LOWRANK_EXECUTED_NOTEBOOKS names a folder holding every notebook already executed with
today's cells (tests/test_notebooks.py writes them; scripts/test.sh runs the notebooks once).
"""

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS)]

import apigen  # noqa: E402  (needs the paths above)

project = "lowrank"
author = "the lowrank authors"
copyright = "2026, the lowrank authors"

extensions = [
    "myst_nb",
    "sphinx_design",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "README.md", "**.ipynb_checkpoints", "notebooks/src"]
suppress_warnings = ["mystnb.unknown_mime_type"]

# Every reference into lowrank must resolve; names of other projects cannot be checked offline.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!lowrank\b).*")]
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each
napoleon_custom_sections = [("Fields", "params_style"), ("Array leaves", "params_style"),
                            ("Static metadata", "params_style")]

# The docstrings write `x` for code, as Markdown does (in reStructuredText it would be italic).
default_role = "code"
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autosummary_generate = False  # the pages are ours (apigen); autosummary only draws tables
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3


def executed_notebooks(folder: str | None) -> dict[str, Path] | None:
    """Each notebook's executed copy in ``folder``, or None unless every notebook has one whose
    cells are today's (a copy left from older sources must not be rendered)."""
    if not folder:
        return None
    import nbformat

    def sources(path):
        return [cell.source for cell in nbformat.read(path, as_version=4).cells]

    copies = {}
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        copy = Path(folder) / notebook.name
        if not copy.is_file() or sources(copy) != sources(notebook):
            return None
        copies[notebook.name] = copy
    return copies


EXECUTED = executed_notebooks(os.environ.get("LOWRANK_EXECUTED_NOTEBOOKS"))

# Notebooks and the guides' code cells: executed on every build (small mode comes from the
# environment, see docs.sh) but for notebooks the tests executed; a cell that raises fails it.
nb_execution_mode = "force"
nb_execution_excludepatterns = ["notebooks/*.ipynb"] if EXECUTED else []
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = "lowrank"
html_static_path = ["_static"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_last_updated_fmt = None

# Build-time generation, switched off by projects that reuse this configuration (the tests).
lowrank_api = True
lowrank_notebooks = True


def _generate(app):
    if app.config.lowrank_api:
        apigen.write_pages(Path(app.srcdir) / "api")
    if app.config.lowrank_notebooks:
        target = Path(app.srcdir) / "notebooks"
        target.mkdir(exist_ok=True)
        for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
            notebook = EXECUTED[notebook.name] if EXECUTED else notebook
            copy = target / notebook.name
            if not copy.is_file() or copy.read_bytes() != notebook.read_bytes():
                shutil.copyfile(notebook, copy)


def setup(app):
    app.add_config_value("lowrank_api", True, "env")
    app.add_config_value("lowrank_notebooks", True, "env")
    app.connect("builder-inited", _generate)
