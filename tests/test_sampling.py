"""The sampler shared by models.generate and exported generators: greedy,
top-k and nucleus (top-p) against closed-form distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import sampling

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _frequencies(n=20000, **options):
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (n, 1)), jnp.float32))
    tokens = sampling.sample_logits(jax.random.PRNGKey(0), logits, jnp.float32(options.get("temperature", 1.0)),
                                    options.get("top_k", 0), jnp.float32(options.get("top_p", 1.0)))
    return np.bincount(np.asarray(tokens), minlength=len(PROBS)) / n


@pytest.mark.parametrize("options, expected", [
    ({}, PROBS),                                            # plain softmax sampling
    ({"top_k": 2}, PROBS[:2] / PROBS[:2].sum()),            # the two likeliest, renormalised
    ({"top_p": 0.7}, [0.625, 0.375, 0, 0]),                 # 0.5 < 0.7 so token 1 stays; 0.8 >= 0.7 ends it
    ({"top_p": 0.5}, [1, 0, 0, 0]),                         # the likeliest token always stays
    ({"temperature": 2.0}, np.sqrt(PROBS) / np.sqrt(PROBS).sum()),
])
def test_sampled_frequencies_match_the_closed_form(options, expected):
    np.testing.assert_allclose(_frequencies(**options), np.pad(expected, (0, 4 - len(expected))), atol=0.015)


def test_temperature_zero_is_greedy_and_the_seed_fixes_the_draws():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 11)), jnp.float32)
    greedy = sampling.Sampler(temperature=0.0)(logits)
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    a, b = sampling.Sampler(seed=4), sampling.Sampler(seed=4)
    assert [np.asarray(a(logits)).tolist() for _ in range(5)] == [np.asarray(b(logits)).tolist() for _ in range(5)]


def test_bad_sampling_arguments_are_named():
    with pytest.raises(ValueError, match="temperature must be a number >= 0, got -1"):
        sampling.Sampler(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\] \(1: all tokens\), got 0"):
        sampling.Sampler(top_p=0)
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        sampling.Sampler(top_k=1.5)
