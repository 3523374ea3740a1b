"""The API reference's pages, generated from the code at build time (never typed by hand).

Two kinds of page, one per module:

* a **package** (``lowrank``, ``lowrank.quant``, ``lowrank.train``, ...) documents exactly its
  ``__all__``; a module named in a package's ``__all__`` (``lowrank.optim``) is one too;
* any **other module** documents the public names it defines (or its own ``__all__``) that no
  package exports, at the module's own path (``lowrank.paths.flatten``). A module whose names
  are all exported by a package has no page: its names are documented where users import them.

So a name added to an ``__all__``, or a new module, appears without editing the docs.

>>> pages = api_pages()
>>> ".. autofunction:: apply" in pages["lowrank.rst"]  # documented where it is exported
True
>>> ".. autofunction:: quantize" in pages["lowrank.rst"]  # listed, documented in lowrank.quant
False
>>> ":py:obj:`~lowrank.quant.quantize`" in pages["lowrank.rst"]
True
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
from pathlib import Path

PACKAGE = "lowrank"

INDEX_INTRO = """\
API reference
=============

Generated from the code: each package's page documents its ``__all__`` (what ``import
lowrank as lr`` and ``from lowrank import quant, train, ...`` give you); the modules below them
document the remaining public names at the path they live at. Every example on these pages is
run as a doctest in CI.
"""


def module_names(package: str = PACKAGE) -> list[str]:
    """Every module of ``package``, the package first; private (``_x``) modules are left out.

    >>> names = module_names()
    >>> names[0], "lowrank.quant.tree" in names
    ('lowrank', True)
    """
    root = importlib.import_module(package)
    names = [m.name for m in pkgutil.walk_packages(root.__path__, f"{package}.")]
    public = [n for n in names if not any(part.startswith("_") for part in n.split("."))]
    return [package, *sorted(public)]


def _exporters(modules: dict[str, types.ModuleType]) -> tuple[dict[int, list[str]], set[str]]:
    """``{id(object): [packages exporting it]}`` for classes and functions, and the modules
    named in an ``__all__``."""
    objects: dict[int, list[str]] = {}
    submodules = set()
    for name, module in modules.items():
        if not hasattr(module, "__path__"):
            continue
        for attr in getattr(module, "__all__", ()):
            value = getattr(module, attr)
            if inspect.ismodule(value):
                submodules.add(value.__name__)
            elif inspect.isclass(value) or callable(value):  # data (an int) has no identity
                objects.setdefault(id(value), []).append(name)
    return objects, submodules


def _own_names(module: types.ModuleType) -> list[str]:
    """The public names a module without ``__all__`` defines itself (classes and functions)."""
    return [n for n, v in vars(module).items()
            if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
            and getattr(v, "__module__", None) == module.__name__]


def _directive(value: object) -> str:
    if inspect.isclass(value):
        return "autoexception" if issubclass(value, BaseException) else "autoclass"
    if callable(value):
        return "autofunction"
    return "autodata"


def summary(value: object) -> str:
    """The first paragraph of a class's or function's docstring, on one line ("" for data,
    whose ``__doc__`` is its type's).

    >>> summary(summary)[:50]
    "The first paragraph of a class's or function's doc"
    >>> summary(3)
    ''
    """
    if not (inspect.isclass(value) or callable(value)):
        return ""
    doc = inspect.getdoc(value) or ""
    return " ".join(doc.split("\n\n")[0].split())


def home(value: object, exporters: list[str]) -> str:
    """Where an object exported by several packages is documented: the exporter whose name is
    the longest prefix of the module that defines it (``lowrank.quant`` for ``quantize``),
    else the first.

    >>> from lowrank.quant import quantize
    >>> home(quantize, ["lowrank", "lowrank.quant"])
    'lowrank.quant'
    """
    module = getattr(value, "__module__", None) or ""
    inside = [e for e in exporters if module == e or module.startswith(e + ".")]
    return max(inside, key=len) if inside else exporters[0]


def _page(name: str, members: list[tuple[str, object, str]], submodules: list[str]) -> str:
    """One module's page: its docstring, a table of its names (each linking to where it is
    documented) and the documentation of those whose home is this module."""
    lines = [name, "=" * len(name), "", f".. automodule:: {name}", "   :no-members:", "",
             f".. currentmodule:: {name}", ""]
    if submodules:
        lines += ["Modules: " + ", ".join(f":mod:`{m}`" for m in submodules) + ".", ""]
    if members:
        lines += [".. list-table::", "   :widths: 30 70", ""]
        for attr, value, where in members:
            lines += [f"   * - :py:obj:`~{where}.{attr}`", f"     - {summary(value)}".rstrip()]
        lines += [""]
    for attr, value, where in members:
        directive = _directive(value)
        if where != name:  # a short entry, so that references to this path resolve too
            kind = {"autoclass": "class", "autoexception": "exception"}.get(directive, "function")
            lines += [f".. py:{kind}:: {attr}", "",
                      f"   The same object as :py:obj:`{where}.{attr}`.", ""]
            continue
        if directive == "autodata":  # autodata would show the type's docstring (a dict's)
            lines += [f".. py:data:: {attr}", f"   :type: {type(value).__name__}"]
            if isinstance(value, int | float | str | tuple) and len(repr(value)) < 80:
                lines += [f"   :value: {value!r}"]
        else:
            lines += [f".. {directive}:: {attr}"]
            lines += ["   :members:"] if directive == "autoclass" else []
        lines += [""]
    return "\n".join(lines)


def api_pages(package: str = PACKAGE) -> dict[str, str]:
    """``{file name: reStructuredText}`` of the reference: one page per documented module,
    and ``index.rst`` with the packages' and the modules' tables of contents. An object that
    several packages export is documented once, at its :func:`home`, and listed by all."""
    modules = {n: importlib.import_module(n) for n in module_names(package)}
    exporters, named_modules = _exporters(modules)
    packages, others, pages = [], [], {}
    for name, module in modules.items():
        is_public_face = hasattr(module, "__path__") or name in named_modules
        if is_public_face and hasattr(module, "__all__"):
            attrs = list(module.__all__)
        elif is_public_face:
            attrs = _own_names(module)
        else:
            attrs = [a for a in getattr(module, "__all__", None) or _own_names(module)
                     if id(getattr(module, a)) not in exporters]
            if not attrs:
                continue
        values = [(a, getattr(module, a)) for a in attrs]
        members = [(a, v, home(v, exporters.get(id(v), [name])))
                   for a, v in values if not inspect.ismodule(v)]
        subs = [v.__name__ for _, v in values if inspect.ismodule(v)]
        pages[f"{name}.rst"] = _page(name, members, subs)
        (packages if is_public_face else others).append(name)
    toc = [INDEX_INTRO]
    for caption, names in (("Packages", packages), ("Modules", others)):
        toc += [f".. toctree::\n   :caption: {caption}\n   :maxdepth: 1\n"]
        toc += [f"   {n}" for n in names] + [""]
    pages["index.rst"] = "\n".join(toc)
    return pages


def write_pages(out_dir: Path, package: str = PACKAGE) -> list[Path]:
    """Writes :func:`api_pages` into ``out_dir``, touching only files whose text changed (so
    Sphinx rebuilds only those) and removing pages of modules that no longer exist."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pages = api_pages(package)
    written = []
    for stale in set(p.name for p in out_dir.glob("*.rst")) - set(pages):
        (out_dir / stale).unlink()
    for file_name, text in pages.items():
        path = out_dir / file_name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written
