"""Builds the notebooks from their reviewable sources: ``notebooks/src/<name>.py`` (plain Python
in the "percent" cell format) -> ``notebooks/<name>.ipynb``, saved without outputs.

    python notebooks/build.py           # write every notebook
    python notebooks/build.py --check   # exit 1 if a notebook differs from its source

A source is a sequence of cells, each opened by a marker line: ``# %%`` for code, ``# %% [md]``
for Markdown (whose lines are comments, ``# `` stripped). Text before the first marker (the
module docstring) is not part of the notebook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
NAMES = ("01_quickstart", "02_quantization", "03_subspaces", "04_results")
CODE, MARKDOWN = "# %%", "# %% [md]"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def parse_cells(text: str, name: str = "<source>") -> list[tuple[str, str]]:
    """``[(kind, source)]`` of a percent-format source, ``kind`` "code" or "markdown".

    >>> parse_cells("# %% [md]\\n# # Title\\n#\\n# Text.\\n# %%\\nx = 1\\n")
    [('markdown', '# Title\\n\\nText.'), ('code', 'x = 1')]
    """
    cells: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line in (CODE, MARKDOWN):
            cells.append(("markdown" if line == MARKDOWN else "code", []))
        elif line.startswith("# %%"):
            raise ValueError(f"{name}:{number}: unknown cell marker {line!r}; accepted: "
                             f"{CODE!r}, {MARKDOWN!r}")
        elif cells and cells[-1][0] == "markdown":
            if line and line != "#" and not line.startswith("# "):
                raise ValueError(f"{name}:{number}: a Markdown cell holds only '# ' comment "
                                 f"lines, got {line!r}")
            cells[-1][1].append(line[2:])
        elif cells:
            cells[-1][1].append(line)
    if not cells:
        raise ValueError(f"{name} has no cells: open each with {CODE!r} or {MARKDOWN!r}")
    out = [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]
    empty = [i for i, (_, source) in enumerate(out) if not source.strip()]
    if empty:
        raise ValueError(f"{name}: cell {empty[0]} is empty")
    return out


def build(name: str) -> nbformat.NotebookNode:
    """The notebook of ``notebooks/src/<name>.py``: no outputs, cell ids numbered (stable diffs).

    >>> [c.cell_type for c in build("04_results").cells][:2]
    ['markdown', 'code']
    """
    if name not in NAMES:
        raise ValueError(f"unknown notebook {name!r}; accepted: {NAMES}")
    source = SOURCES / f"{name}.py"
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNELSPEC,
                                            "language_info": {"name": "python"}})
    for i, (kind, text) in enumerate(parse_cells(source.read_text(), str(source))):
        make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        nb.cells.append(make(text, id=f"cell-{i:02d}"))
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """The notebook as the file's text (what is committed)."""
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a notebook is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in NAMES:
        text, target = render(build(name)), HERE / f"{name}.ipynb"
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.write_text(text)
    if stale:
        print(f"out of date with notebooks/src: {', '.join(stale)}; run python notebooks/build.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
