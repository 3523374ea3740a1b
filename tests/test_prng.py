"""lowrank.prng's hash generator: the same distribution as JAX's uniform bits (bit balance,
keep rates, no correlation between neighbours, positions or keys), keys shared with threefry,
and a training run whose dropout draws from it (``config.dropout_prng``) trains, differs from
threefry's bits only, and resumes bit-identically."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank import prng, results
from lowrank.train import TrainState, default_config, toy, train

N = 1 << 20


def _words(key, n=N):
    return np.asarray(jax.random.bits(key, (n,), jnp.uint32), np.uint64)


def test_every_bit_is_balanced_and_bytes_are_uniform():
    words = _words(prng.key(0))
    bits = (words[:, None] >> np.arange(32, dtype=np.uint64)) & 1
    # each bit position's mean within 5 standard errors of 1/2
    assert np.all(np.abs(bits.mean(0) - 0.5) < 5 * 0.5 / np.sqrt(N))
    counts = np.bincount(np.asarray(jax.random.bits(prng.key(1), (N,), jnp.uint8)),
                         minlength=256)
    chi2 = float(((counts - N / 256) ** 2 / (N / 256)).sum())
    assert chi2 < 255 + 5 * np.sqrt(2 * 255)  # 255 degrees of freedom, 5 sigma


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_bernoulli_keep_rate_is_p(p):
    kept = float(jax.random.bernoulli(prng.key(2), p, (N,)).mean())
    assert abs(kept - p) < 5 * np.sqrt(p * (1 - p) / N)


def test_neighbours_positions_and_keys_are_uncorrelated():
    u = np.asarray(jax.random.uniform(prng.key(3), (N,)))
    bound = 5 / np.sqrt(N)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < bound  # neighbours
    assert abs(np.corrcoef(u, np.arange(N))[0, 1]) < bound  # position
    k = prng.key(3)
    a = np.asarray(jax.random.uniform(jax.random.fold_in(k, 0), (N,)))
    b = np.asarray(jax.random.uniform(jax.random.fold_in(k, 1), (N,)))
    assert abs(np.corrcoef(a, b)[0, 1]) < bound  # keys one apart
    np.testing.assert_array_equal(a, np.asarray(jax.random.uniform(jax.random.fold_in(k, 0),
                                                                   (N,))))


def test_keys_are_threefrys_and_only_the_bits_differ():
    for make in (lambda k: jax.random.split(k, 3), lambda k: jax.random.fold_in(k, 7)):
        ours, theirs = make(prng.key(5)), make(jax.random.key(5))
        np.testing.assert_array_equal(jax.random.key_data(ours), jax.random.key_data(theirs))
    assert not np.array_equal(_words(prng.key(5), 64), _words(jax.random.key(5), 64))
    assert jax.random.bits(prng.key(5), (3, 5), jnp.uint16).shape == (3, 5)
    assert jax.random.bits(prng.key(5), (7,), jnp.uint8).shape == (7,)
    with pytest.raises(ValueError, match=r"PRNG 'philox' is not supported; accepted: "
                                         r"\('hash', 'threefry'\)"):
        prng.key(0, "philox")


def test_flax_dropout_draws_from_it_under_jit_and_vmap():
    drop = nn.Dropout(0.25, deterministic=False)
    x = jnp.ones((64, 256))

    @jax.jit
    def masks(keys):
        return jax.vmap(lambda k: drop.apply({}, x, rngs={"dropout": k}))(keys)

    out = np.asarray(masks(jax.random.split(prng.key(6), 4)))
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((out == 0).mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / out.size)
    assert not np.array_equal(out[0], out[1])


def _config(tmp_path, name, steps=6):
    config = default_config()
    config.steps, config.batch_size, config.quiet = steps, 8, True
    config.lora.dropout, config.dropout_prng = 0.3, name
    config.checkpoint.every, config.log.tensorboard = 3, False
    config.workdir = str(tmp_path / name) if tmp_path else None
    return config


def test_training_with_hash_dropout_resumes_exactly_and_differs_from_threefry(tmp_path):
    whole = train(_config(tmp_path, "hash"))
    threefry = train(_config(None, "threefry"))
    first = train(_config(tmp_path / "resumed", "hash", steps=3))
    assert first.start_step == 0
    resumed = train(_config(tmp_path / "resumed", "hash"))
    assert resumed.start_step == 3
    for a, b in zip(jax.tree.leaves(resumed.state.trainable),
                    jax.tree.leaves(whole.state.trainable), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(whole.state.trainable), jax.tree.leaves(threefry.state.trainable),
        strict=True))
    assert whole.state.rng_impl == "hash" and threefry.state.rng_impl == "threefry"


def test_the_default_generator_keeps_config_hashes_and_bad_names_are_refused():
    config = default_config()
    before = results.config_hash(config)
    with config.unlocked():
        del config["dropout_prng"]  # a config written before the field existed
    assert results.config_hash(config) == before
    threefry = default_config()
    threefry.dropout_prng = "threefry"
    assert results.config_hash(threefry) != before
    with pytest.raises(ValueError, match="'philox' is not supported"):
        TrainState.create({}, optax.sgd(0.1), jax.random.key(0), "philox")
    assert toy  # the default task of default_config
