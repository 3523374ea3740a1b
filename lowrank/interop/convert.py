"""Converts an adapters-only export (``lowrank.train``'s ``adapters.safetensors`` +
``adapters.json``) to PEFT files and back. No weights of the base are read: its config.json
and tensor names are enough to name the modules.

    python -m lowrank.interop.convert to-peft  RUN/adapters  OUT/peft     --base HF_DIR
    python -m lowrank.interop.convert from-peft PEFT_DIR     OUT/adapters --base HF_DIR

An export made from scanned layers (stacked adapters) is recognised as such; ``from-peft``
writes looped adapters unless ``--scan-layers`` is given. A destination that exists and is
not an empty folder is refused unless ``--overwrite`` is given. Errors in the input (a missing
or damaged file, an unsupported option) are printed on one line, naming the file.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from lowrank import paths
from lowrank.interop import peft
from lowrank.models import hf
from lowrank.spec import LoraSpec
from lowrank.train import export


def spec_of(lora: Mapping) -> LoraSpec:
    """The ``LoraSpec`` recorded in an export's ``lora`` section (absent fields: defaults).

    >>> spec_of({"rank": 4, "alpha": 8.0, "rslora": True, "rank_pattern": [[".*v.*", 2]]})
    ... # doctest: +ELLIPSIS
    LoraSpec(rank=4, alpha=8.0, ..., rank_pattern=(('.*v.*', 2),), ..., rslora=True, ...)
    """
    names = {f.name for f in dataclasses.fields(LoraSpec)}
    return LoraSpec(**{k: v for k, v in lora.items() if k in names})


def check_destination(dst: str | Path, overwrite: bool = False) -> None:
    """Raises FileExistsError when ``dst`` exists and is not an empty folder, unless
    ``overwrite``: a conversion never replaces files silently.

    >>> import tempfile
    >>> check_destination(Path(tempfile.mkdtemp()) / "new")
    >>> check_destination(__file__)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileExistsError: .../convert.py already exists: pass --overwrite (overwrite=True) to...
    """
    path = Path(dst)
    if overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    raise FileExistsError(f"{path} already exists: pass --overwrite (overwrite=True) to write "
                          "over it, or choose a new destination")


def to_peft(src: str | Path, dst: str | Path, base: str | Path, *,
            overwrite: bool = False) -> Path:
    """Writes the adapters export ``src`` as a PEFT adapter in ``dst`` (an existing ``dst``
    only with ``overwrite``).

    >>> to_peft("run/adapters", "run/peft", "models/tiny_llama")  # doctest: +SKIP
    PosixPath('run/peft')
    """
    check_destination(dst, overwrite)
    index = export.read_index(src)
    adapters = export.load_adapters(src)
    model = hf.build_model(base)
    layer_list = hf.architecture_of(model).layer_list
    if any(hf.is_stacked(p, layer_list) for p in paths.flatten(adapters)):
        model = hf.build_model(base, scan_layers=True)
    return peft.save(dst, spec_of(index.get("lora") or {}), adapters, model,
                     base_model_name_or_path=str(base))


def from_peft(src: str | Path, dst: str | Path, base: str | Path, *,
              scan_layers: bool = False, overwrite: bool = False) -> Path:
    """Writes the PEFT adapter ``src`` as an adapters export in ``dst`` (an existing ``dst``
    only with ``overwrite``).

    >>> from_peft("hub/adapter", "run/adapters", "models/tiny_llama")  # doctest: +SKIP
    PosixPath('run/adapters')
    """
    check_destination(dst, overwrite)
    model = hf.build_model(base, scan_layers=scan_layers)
    spec, adapters = peft.load(src, hf.abstract_params(model), model)
    return export.export_adapters(dst, adapters, lora=dataclasses.asdict(spec),
                                  base={"source": str(base), "converted_from": str(src)})


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m lowrank.interop.convert",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    for name, help_ in (("to-peft", "adapters export -> PEFT adapter"),
                        ("from-peft", "PEFT adapter -> adapters export")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
        p.add_argument("--base", type=Path, required=True,
                       help="Hugging Face directory of the base model (config.json + weights)")
        p.add_argument("--overwrite", action="store_true",
                       help="write into DST even if it exists (its files are replaced)")
        if name == "from-peft":
            p.add_argument("--scan-layers", action="store_true",
                           help="write stacked adapters for a model built with scan_layers")
    args = parser.parse_args(argv)
    try:
        if args.direction == "to-peft":
            out = to_peft(args.src, args.dst, args.base, overwrite=args.overwrite)
        else:
            out = from_peft(args.src, args.dst, args.base, scan_layers=args.scan_layers,
                            overwrite=args.overwrite)
    except (OSError, ValueError, KeyError) as e:  # bad input: the message names it
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
