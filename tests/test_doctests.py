"""The docstring examples run as doctests (``--doctest-modules``, see pyproject.toml); an
example marked ``+SKIP`` (it needs the MiniLM / BBC assets, a Hugging Face directory, or
minutes) must name the test that checks the same behaviour for real, here."""

import ast
import doctest
import importlib
import pkgutil
from pathlib import Path

import lowrank

TESTS = Path(__file__).resolve().parent

# Docstring with a skipped example -> the test that exercises the same calls (directly, or
# through the public function that calls them).
COVERED_BY = {
    "lowrank.assets.asset_dir": "test_assets.py::test_cached_asset_is_reused_without_pip",
    "lowrank.assets.bbc_dir": "test_data.py::test_bbc_has_2225_articles_in_5_sorted_topics",
    "lowrank.assets.cache_dir": "test_assets.py::test_cache_dir_follows_lowrank_cache",
    "lowrank.assets.minilm_dir": "test_assets.py::test_minilm_asset_is_a_hugging_face_directory",
    "lowrank.data.bbc": "test_data.py::test_bbc_split_is_stratified_disjoint_and_stable",
    "lowrank.data.bbc.classification_arrays":
        "test_data.py::test_bbc_classification_arrays_feed_batches",
    "lowrank.data.bbc.load_bbc": "test_data.py::test_bbc_has_2225_articles_in_5_sorted_topics",
    "lowrank.data.bbc.split_bbc": "test_data.py::test_bbc_split_is_stratified_disjoint_and_stable",
    "lowrank.data.bbc.split_digest":
        "test_data.py::test_bbc_split_is_stratified_disjoint_and_stable",
    "lowrank.data.tokenize":
        "test_data.py::test_tokenizer_pads_to_max_length_and_truncates_keeping_sep",
    "lowrank.data.tokenize.encode":
        "test_data.py::test_tokenizer_pads_to_max_length_and_truncates_keeping_sep",
    "lowrank.data.tokenize.load_tokenizer":
        "test_data.py::test_tokenizer_pads_to_max_length_and_truncates_keeping_sep",
    "lowrank.interop":
        "test_interop_bnb.py::test_qlora_with_peft_adapter_equals_transformers_bitsandbytes_peft",
    "lowrank.interop.bnb":
        "test_interop_bnb.py::test_writing_what_was_read_reproduces_the_checkpoint_bit_for_bit",
    "lowrank.interop.bnb.from_bnb":
        "test_interop_bnb.py::test_reads_nf4_double_quant_as_quantized_arrays",
    "lowrank.interop.bnb.load":
        "test_interop_bnb.py::test_quantized_model_gives_transformers_bitsandbytes_outputs",
    "lowrank.interop.bnb.save":
        "test_interop_bnb.py::test_writing_what_was_read_reproduces_the_checkpoint_bit_for_bit",
    "lowrank.interop.convert.from_peft": "test_interop_export.py::test_converter_to_peft_and_back",
    "lowrank.interop.convert.to_peft": "test_interop_export.py::test_converter_to_peft_and_back",
    "lowrank.interop.hf_export": "test_interop_export.py::"
                                 "test_merged_qlora_export_loaded_by_transformers_equals_our_adapted_model",
    "lowrank.interop.peft": "test_interop_peft.py::test_round_trip_keeps_ranks_alphas_and_scales",
    "lowrank.interop.peft_adalora":
        "test_interop_peft_adalora.py::test_round_trip_keeps_outputs_and_writes_peft_s_layout",
    "lowrank.interop.peft_adalora.load":
        "test_interop_peft_adalora.py::test_peft_adalora_adapter_gives_peft_outputs",
    "lowrank.interop.peft_adalora.save":
        "test_interop_peft_adalora.py::test_our_adalora_adapter_gives_the_outputs_peft_computed_from_it",
    "lowrank.interop.peft_vera": "test_interop_peft_vera.py::test_round_trip_writes_peft_s_layout",
    "lowrank.interop.peft_vera.load":
        "test_interop_peft_vera.py::test_peft_vera_adapter_gives_peft_outputs",
    "lowrank.interop.peft_vera.save":
        "test_interop_peft_vera.py::test_our_vera_adapter_gives_the_outputs_peft_computed_from_it",
    "lowrank.interop.peft.load": "test_interop_peft.py::test_adapter_gives_peft_outputs",
    "lowrank.interop.peft.save":
        "test_interop_peft.py::test_save_writes_exactly_the_files_peft_read",
    "lowrank.models": "test_models.py::test_save_pretrained_writes_back_the_same_tensors",
    "lowrank.models.loading.from_pretrained":
        "test_quantize_on_load.py::test_quantize_on_load_equals_quantize_tree_bit_for_bit",
    "lowrank.models.hf.save_pretrained":
        "test_models.py::test_save_pretrained_writes_back_the_same_tensors",
}


def skipped_examples(package=lowrank) -> dict[str, int]:
    """``{docstring name: number of +SKIP examples}`` over every module of ``package``."""
    finder, found = doctest.DocTestFinder(), {}
    names = [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__,
                                                                        package.__name__ + ".")]
    for name in names:
        for test in finder.find(importlib.import_module(name), name):
            skips = sum(bool(ex.options.get(doctest.SKIP)) for ex in test.examples)
            if skips:
                found[test.name] = skips
    return found


def test_doctests_are_collected_from_the_package():
    import tomllib
    options = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]
    assert "lowrank" in options["ini_options"]["testpaths"]
    assert "--doctest-modules" in options["ini_options"]["addopts"]


def test_every_skipped_example_names_the_test_that_runs_it_for_real():
    skipped = skipped_examples()
    assert sum(skipped.values()) >= 20  # the finder sees them (27 when this was written)
    missing = sorted(set(skipped) - set(COVERED_BY))
    assert not missing, f"+SKIP examples in {missing}: name their real test in COVERED_BY"
    stale = sorted(set(COVERED_BY) - set(skipped))
    assert not stale, f"COVERED_BY lists docstrings that no longer skip an example: {stale}"


def test_the_named_tests_exist():
    for where in set(COVERED_BY.values()):
        file_name, test_name = where.split("::")
        tree = ast.parse((TESTS / file_name).read_text())
        names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert test_name in names, f"{where} does not exist"
