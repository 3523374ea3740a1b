"""lowrank.models.hf: building a model from a directory, and initialising a missing head."""

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from lowrank import models
from lowrank.models import BertForSequenceClassification, BertModel, LlamaForCausalLM

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def names_only_copy(tmp_path, name, drop=r"^$"):
    """`name`'s config.json with a checkpoint of the same tensor names, each one float."""
    target = tmp_path / name
    target.mkdir(parents=True)
    shutil.copy(FIXTURES / name / "config.json", target)
    with models.hf.Checkpoint(FIXTURES / name) as ckpt:
        keys = [k for k in ckpt.keys() if not re.match(drop, k)]
    safetensors.numpy.save_file({k: np.zeros(1, np.float32) for k in keys},
                                str(target / "model.safetensors"))
    return target


def test_build_model_reads_names_not_weights(tmp_path):
    d = names_only_copy(tmp_path, "tiny_bert")
    model = models.build_model(d)
    assert type(model) is BertModel and model.add_pooling_layer
    assert model.config.hidden_size == 16
    with pytest.raises(ValueError, match="has shape"):
        models.load_params(model, d)
    # The tensor names decide the pooler.
    no_pooler = names_only_copy(tmp_path / "np", "tiny_bert", drop=r"pooler\.")
    assert not models.build_model(no_pooler).add_pooling_layer


def test_build_model_is_the_model_from_pretrained_returns():
    d = FIXTURES / "tiny_bert_cls"
    model = models.build_model(d, pooling="mean")
    assert isinstance(model, BertForSequenceClassification)
    assert (model.num_labels, model.pooling) == (3, "mean")  # labels from config.json
    assert model == models.from_pretrained(d, pooling="mean")[0]
    llama = models.build_model(FIXTURES / "tiny_llama", scan_layers=True, remat=True)
    assert isinstance(llama, LlamaForCausalLM) and llama.scan_layers and llama.remat


def test_build_model_names_a_bad_model_type(tmp_path):
    d = names_only_copy(tmp_path, "tiny_bert")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type='gpt2' .* accepted: \['bert', 'llama'\]"):
        models.build_model(d)


def test_new_head_gets_the_values_of_a_full_init():
    key = jax.random.key(3)
    model, params = models.from_pretrained(FIXTURES / "tiny_bert", num_labels=4,
                                           pooling="mean", key=key)
    # Jitted, as loading was before it initialised only the missing leaves (eager init rounds
    # the truncated normal differently in the last bit).
    full = jax.jit(model.init)(key, np.zeros((1, 1), np.int32))["params"]
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(params["classifier"][leaf], full["classifier"][leaf])
    assert float(np.std(params["classifier"]["kernel"])) > 0
    # Only the head is new: the base comes from the checkpoint, not from the init.
    assert not np.allclose(params["bert"]["encoder"]["layer_0"]["output"]["dense"]["kernel"],
                           full["bert"]["encoder"]["layer_0"]["output"]["dense"]["kernel"])
