"""Methods and base-changing inits through ``train(config)``: DoRA, PiSSA, LoftQ."""

import dataclasses

import jax
import numpy as np
import pytest

import lowrank as lr
from lowrank.train import default_config, toy, train
from lowrank.train.loop import init_run


def _config(**lora):
    config = default_config()
    config.steps, config.batch_size, config.quiet = 3, 8, True
    config.log.tensorboard = False
    for k, v in lora.items():
        config.lora[k] = v
    return config


def test_pissa_from_the_config_makes_the_residual_base_and_trains_over_it():
    config = _config(init="pissa", rank=4)
    task = toy.classifier(config)
    frozen, state = init_run(config, task)
    merged = lr.merge(frozen, state.trainable)
    for p, w in lr.paths.flatten(task.params).items():
        np.testing.assert_allclose(lr.paths.flatten(merged)[p], w, rtol=1e-4, atol=1e-5)
    assert not np.allclose(frozen["hidden_0"]["kernel"], task.params["hidden_0"]["kernel"])
    result = train(config, task)
    assert int(result.state.step) == 3 and np.isfinite(result.metrics["loss"])


def test_loftq_from_the_config_quantizes_the_tasks_float_base():
    config = _config(init="loftq", rank=4)
    task = dataclasses.replace(toy.classifier(config), quant=lr.QuantSpec("nf4", block_size=32))
    frozen, state = init_run(config, task)
    kernel = task.params["hidden_0"]["kernel"]
    q = frozen["hidden_0"]["kernel"]
    assert lr.is_quantized(q)
    plain = np.abs(lr.dequantize(q) - kernel).mean()
    fitted = np.abs(lr.merge(frozen, state.trainable)["hidden_0"]["kernel"] - kernel).mean()
    assert fitted < plain  # the adapters start on the quantization error
    result = train(config, task)
    assert int(result.state.step) == 3 and np.isfinite(result.metrics["loss"])


def test_base_changing_inits_refuse_a_quantized_task_base():
    config = _config(init="pissa")
    task = toy.classifier(config)
    task = dataclasses.replace(task, params=lr.quantize_tree(task.params, lr.QuantSpec("int8")))
    with pytest.raises(ValueError, match="already quantized"):
        init_run(config, task)


def test_dora_trains_from_the_config_and_its_magnitude_moves():
    config = _config(method="dora")
    result = train(config)
    leaf = result.trainable["hidden_0"]["kernel"]
    assert isinstance(leaf, lr.DoraPair)
    start = np.linalg.norm(toy.classifier(config).params["hidden_0"]["kernel"], axis=0)
    assert np.abs(np.asarray(leaf.magnitude) - start).max() > 1e-4
    assert np.isfinite(result.metrics["loss"])
    assert jax.tree.structure(result.trainable) == jax.tree.structure(
        init_run(config, toy.classifier(config))[1].trainable)
