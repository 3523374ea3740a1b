"""Converts an adapters-only export (``lowrank.train``'s ``adapters.safetensors`` +
``adapters.json``) to PEFT files and back. No weights of the base are read: its config.json
and tensor names are enough to name the modules.

    python -m lowrank.interop.convert to-peft  RUN/adapters  OUT/peft     --base HF_DIR
    python -m lowrank.interop.convert from-peft PEFT_DIR     OUT/adapters --base HF_DIR

An export made from scanned layers (stacked adapters) is recognised as such; ``from-peft``
writes looped adapters unless ``--scan-layers`` is given.
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


def to_peft(src: str | Path, dst: str | Path, base: str | Path) -> Path:
    """Writes the adapters export ``src`` as a PEFT adapter in ``dst``.

    >>> to_peft("run/adapters", "run/peft", "models/tiny_llama")  # doctest: +SKIP
    PosixPath('run/peft')
    """
    index = export.read_index(src)
    adapters = export.load_adapters(src)
    model = hf.build_model(base)
    layer_list = hf.architecture_of(model).layer_list
    if any(hf.is_stacked(p, layer_list) for p in paths.flatten(adapters)):
        model = hf.build_model(base, scan_layers=True)
    return peft.save(dst, spec_of(index.get("lora") or {}), adapters, model,
                     base_model_name_or_path=str(base))


def from_peft(src: str | Path, dst: str | Path, base: str | Path, *,
              scan_layers: bool = False) -> Path:
    """Writes the PEFT adapter ``src`` as an adapters export in ``dst``.

    >>> from_peft("hub/adapter", "run/adapters", "models/tiny_llama")  # doctest: +SKIP
    PosixPath('run/adapters')
    """
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
        if name == "from-peft":
            p.add_argument("--scan-layers", action="store_true",
                           help="write stacked adapters for a model built with scan_layers")
    args = parser.parse_args(argv)
    if args.direction == "to-peft":
        out = to_peft(args.src, args.dst, args.base)
    else:
        out = from_peft(args.src, args.dst, args.base, scan_layers=args.scan_layers)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
