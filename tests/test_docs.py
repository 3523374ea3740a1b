"""The documentation: its API pages follow the packages' ``__all__`` (docs/apigen.py), and the
build (scripts/docs.sh, warnings as errors) fails on a reference that does not resolve. The
whole site is built by scripts/test.sh after the tests."""

import doctest
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
apigen = importlib.import_module("apigen")


def test_apigen_examples():
    assert doctest.testmod(apigen).failed == 0


@pytest.fixture
def package(tmp_path, monkeypatch):
    """``pkg``: exports ``f`` (defined in ``pkg.impl``) and the module ``pkg.sub``; ``pkg.extra``
    defines ``g``, which no package exports; ``pkg._private`` is private."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text('"""A package."""\nfrom pkg import sub\n'
                                      'from pkg.impl import f\n__all__ = ["f", "sub"]\n')
    (root / "impl.py").write_text('def f():\n    """F."""\n')
    (root / "extra.py").write_text('def g():\n    """G."""\n\n\ndef _h():\n    pass\n')
    (root / "_private.py").write_text('def p():\n    """P."""\n')
    (root / "sub" / "__init__.py").write_text('"""Sub."""\n__all__ = ["K", "f"]\nK = 3\n'
                                              'from pkg.impl import f\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "pkg"
    for name in [m for m in sys.modules if m == "pkg" or m.startswith("pkg.")]:
        del sys.modules[name]


def test_pages_follow_all_and_document_each_object_once(package):
    pages = apigen.api_pages(package)
    assert sorted(pages) == ["index.rst", "pkg.extra.rst", "pkg.rst", "pkg.sub.rst"]
    assert ".. autofunction:: f" in pages["pkg.rst"]            # f's home: pkg defines it
    assert ":mod:`pkg.sub`" in pages["pkg.rst"]
    assert ".. autofunction:: f" not in pages["pkg.sub.rst"]     # listed, pointing home
    assert "The same object as :py:obj:`pkg.f`." in pages["pkg.sub.rst"]
    assert ".. py:data:: K" in pages["pkg.sub.rst"] and ":value: 3" in pages["pkg.sub.rst"]
    assert ".. autofunction:: g" in pages["pkg.extra.rst"] and "_h" not in pages["pkg.extra.rst"]
    index = pages["index.rst"]
    assert index.index("   pkg.sub") < index.index(":caption: Modules") < index.index("pkg.extra")


def test_every_exported_name_of_lowrank_is_on_its_package_page():
    pages = apigen.api_pages()
    for name in apigen.module_names():
        module = importlib.import_module(name)
        if hasattr(module, "__path__"):
            page = pages[f"{name}.rst"]
            for attr in module.__all__:
                assert f":: {attr}\n" in page or f":mod:`{name}.{attr}`" in page, (name, attr)


def _build(tmp_path, page: str) -> subprocess.CompletedProcess:
    """Builds a one-page project with the real configuration through scripts/docs.sh."""
    src = tmp_path / "src"
    src.mkdir(parents=True)
    (src / "conf.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(ROOT / "docs")!r})
        from conf import *  # noqa: F403  (the real configuration)
        lowrank_api = lowrank_notebooks = False
        html_static_path = []
        """))
    (src / "index.md").write_text(page)
    command = ["bash", str(ROOT / "scripts" / "docs.sh"), str(src), str(tmp_path / "out"), "-E"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})


PAGE = """\
# Page

```{eval-rst}
.. autofunction:: lowrank.merge
```

See {func}`lowrank.merge`.
"""


def test_a_broken_cross_reference_fails_the_build(tmp_path):
    good = _build(tmp_path / "good", PAGE)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "good" / "out" / "index.html").is_file()
    broken = _build(tmp_path / "broken", PAGE + "And {func}`lowrank.no_such_function`.\n")
    assert broken.returncode != 0
    assert "reference target not found: lowrank.no_such_function" in broken.stderr


def test_the_build_renders_executed_notebooks_only_when_every_one_has_todays_cells(tmp_path):
    """scripts/test.sh runs the notebooks once: the docs build takes the tests' executed copies
    (docs/conf.py), but never a stale or missing one: then it runs them all itself."""
    import nbformat

    conf = importlib.import_module("conf")
    names = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert len(names) == 4 and conf.executed_notebooks(None) is None
    for name in names:
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        code[-1].outputs = [nbformat.v4.new_output("stream", text="ran\n")]
        nbformat.write(nb, tmp_path / name)
    assert conf.executed_notebooks(str(tmp_path)) == {n: tmp_path / n for n in names}
    stale = nbformat.read(tmp_path / names[1], as_version=4)
    stale.cells[0].source += "\nAn older sentence."
    nbformat.write(stale, tmp_path / names[1])
    assert conf.executed_notebooks(str(tmp_path)) is None
    (tmp_path / names[1]).unlink()
    assert conf.executed_notebooks(str(tmp_path)) is None
