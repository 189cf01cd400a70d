"""Pipeline parallelism on 8 simulated CPU devices: a GPT whose stacked blocks
run as GPipe or circular stages over a ``stage`` axis (with data, FSDP or
tensor parallelism on the other axes) gives the per-layer model's loss and
gradients; the recipe's pipeline run trains like its data=8 run; checkpoints
move between layouts; bad layouts are refused before compiling."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as linen
import jax
import numpy as np
import optax
import pytest

from lepton_jax import checkpoint, config as config_lib, models, parallel, train
from lepton_jax.models import gpt as gpt_lib, pipeline as pipeline_lib
from recipes import gpt

CONFIG = models.GPTConfig(vocab_size=64, max_len=16, num_layers=4, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64,
                          positions="rotary", mlp="swiglu", norm="rms")


def _batch(batch=16, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, size=(batch, seq + 1)).astype(np.int32)
    segments = np.repeat(np.array([[0] * 6 + [1] * (seq - 6)], np.int32), batch, 0)  # two packed documents
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments}


@functools.lru_cache(maxsize=None)
def _per_layer_reference():
    """Loss and gradients of the per-layer GPT on one device (params from its own init)."""
    model = models.GPT(CONFIG)
    batch = _batch()
    params = linen.meta.unbox(model.init(jax.random.PRNGKey(0), batch["inputs"])["params"])

    def loss(params):
        return models.lm_loss(model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"]), batch)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return params, float(value), grads


def _pipelined_loss_and_grads(axes, rules, **pipeline):
    config = dataclasses.replace(CONFIG, scan_layers=True, **pipeline)
    model = models.GPT(config)
    batch = _batch()
    mesh = parallel.make_mesh(axes)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    shardings = parallel.param_shardings(boxed, mesh, rules)
    params = jax.jit(lambda: linen.meta.unbox(model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]),
                     out_shardings=shardings)()

    def loss(params, batch):
        return models.lm_loss(model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"]), batch)

    step = jax.jit(jax.value_and_grad(loss))
    with jax.set_mesh(mesh), linen.logical_axis_rules(parallel.restrict_to_mesh(parallel.get_rules(rules), mesh)):
        sharded = parallel.shard_batch(batch, mesh, rules)
        compiled = step.trace(params, sharded).lower().compile()
    value, grads = compiled(params, sharded)
    return params, float(value), grads, compiled.as_text()


@pytest.mark.slow
@pytest.mark.parametrize("axes, rules, pipeline", [
    ({"stage": 2, "data": 2, "fsdp": 2}, "fsdp", {"pipeline_microbatches": 4}),  # GPipe beside data and FSDP
    ({"stage": 2, "data": 2, "tensor": 2}, "tensor", {"pipeline_microbatches": 2, "pipeline_repeats": 2,
                                                      "remat": True}),  # circular, tensor parallel, remat per stage
    ({"stage": 4, "data": 2}, "data", {"pipeline_microbatches": 4}),
])
def test_pipeline_gives_the_per_layer_models_loss_and_gradients(axes, rules, pipeline):
    ref_params, ref_loss, ref_grads = _per_layer_reference()
    params, loss, grads, hlo = _pipelined_loss_and_grads(axes, rules, **pipeline)
    # Stacked init = the per-layer init, stacked: both layouts start from the same numbers.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), models.unstack_layers(params), ref_params)
    assert params["blocks"]["attention"]["query"].sharding.spec[0] == "stage"  # each stage holds its layers
    assert "collective-permute" in hlo or "collective_permute" in hlo  # activations pass between stages
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    got = models.unstack_layers(grads)
    for path, want in jax.tree_util.tree_leaves_with_path(ref_grads):
        have = functools.reduce(lambda tree, key: tree[key.key], path, got)
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=2e-4, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_scan_layers_without_a_stage_axis_is_the_same_model():
    ref_params, ref_loss, _ = _per_layer_reference()
    model = models.GPT(dataclasses.replace(CONFIG, scan_layers=True))
    batch = _batch()
    params = models.stack_layers(ref_params, CONFIG.num_layers)
    logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"])
    np.testing.assert_allclose(float(models.lm_loss(logits, batch)), ref_loss, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, models.unstack_layers(params), ref_params)
    on_host = models.unstack_layers(jax.device_get(params))  # numpy in, numpy out (views, nothing compiled)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(on_host))
    jax.tree.map(np.testing.assert_array_equal, on_host, ref_params)
    with pytest.raises(ValueError, match="decode needs per-layer parameters"):
        model.apply({"params": params}, batch["inputs"][:, :1], decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match=r"params\['blocks'\] do not fit the config \(num_layers=3, d_model=32, "
                                         r"...\): blocks/attention/key has shape \(4, 32, 2, 8\), "
                                         r"expected \(3, 32, 2, 8\)"):
        models.GPT(dataclasses.replace(CONFIG, scan_layers=True, num_layers=3)).apply({"params": params},
                                                                                     batch["inputs"])
    with pytest.raises(ValueError, match="params have no block_2"):
        models.stack_layers({"block_0": {}, "block_1": {}}, 3)
    with pytest.raises(ValueError, match=r"params have no 'blocks' \(stacked layers\); got keys \['block_0'\]"):
        models.unstack_layers({"block_0": {}})


def test_applying_stacked_layers_works_out_their_shapes_once_per_config(monkeypatch):
    # Flax's ``self.param`` traces a parameter's initialiser on every apply to
    # check its shape; for the stacked blocks that was most of the tracing.
    calls = []
    initialiser = gpt_lib._init_stacked_blocks
    monkeypatch.setattr(gpt_lib, "_init_stacked_blocks", lambda *args: calls.append(args) or initialiser(*args))
    gpt_lib._stacked_shapes.cache_clear()
    model = models.GPT(dataclasses.replace(CONFIG, scan_layers=True))
    params = models.stack_layers(_per_layer_reference()[0], CONFIG.num_layers)
    tokens = _batch()["inputs"]
    for _ in range(3):
        jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params)  # a new function: traced again
    assert len(calls) == 1


def test_bubble_fraction_and_layout_errors():
    assert pipeline_lib.bubble_fraction(1, 8) == 0.0
    assert pipeline_lib.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert pipeline_lib.bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)
    check = functools.partial(pipeline_lib.check_pipeline, num_layers=8, stages=2, repeats=1, microbatches=4,
                              batch=32, data_ways=2)
    check()
    with pytest.raises(ValueError, match=r"8 layers do not split into 3 stages x 1 repeats"):
        check(stages=3)
    with pytest.raises(ValueError, match=r"8 layers do not split into 2 stages x 3 repeats \(= 6\)"):
        check(repeats=3)
    with pytest.raises(ValueError, match=r"batch 32 does not divide into 4 microbatches x 3 data-parallel ways"):
        check(data_ways=3)
    with pytest.raises(ValueError, match=r"needs microbatches >= stages, got 2 microbatches for 4 stages"):
        check(stages=4, repeats=2, microbatches=2)
    with pytest.raises(ValueError, match="microbatches must be a positive int, got 0"):
        check(microbatches=0)


def test_recipe_refuses_bad_layouts_before_compiling(gpt_short_flags, tmp_path):
    flags = [*gpt_short_flags, f"--out={tmp_path}"]
    with pytest.raises(ValueError, match=r"2 layers do not split into 8 stages x 1 repeats"):
        gpt.main([*flags, "--mesh=stage=8"])
    with pytest.raises(ValueError, match=r"batch 8 does not divide into 4 microbatches x 4 data-parallel ways"):
        gpt.main([*flags, "--mesh=stage=2,data=2,fsdp=2", "--microbatches=4"])
    with pytest.raises(ValueError, match=r"--microbatches 2 and --repeats 1 need a pipeline: a stage axis"):
        gpt.main([*flags, "--microbatches=2"])
    with pytest.raises(ValueError, match=r"sequence length 60 does not divide over the seq axis \(8\)"):
        gpt.main([*flags, "--mesh=seq=8", "--seq_len=60"])
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_recipe_pipeline_run_trains_like_data_parallel_and_restores_on_another_mesh(nano_gpt_run, tmp_path, capsys):
    out = str(tmp_path / "pipe")
    # The shared run's 40-step schedule, stopped after step 10.
    run = config_lib.override(gpt.RunConfig(), [*nano_gpt_run.argv[:-1], "--steps=40", "--mesh=stage=2,data=2,fsdp=2",
                                                "--microbatches=2", f"--out={out}"])
    stop = train.FunctionHook(lambda loop: loop.request_stop("test: 10 steps") if loop.step >= 10 else None)
    result = gpt.train_run(run, extra_hooks=[stop])
    assert result["steps"] == 10
    printed = capsys.readouterr().out
    assert "pipeline: 2 stages x 1 repeat(s) of 1 layer(s), 2 microbatches of 4: bubble" in printed
    assert result["pipeline_bubble"] == pytest.approx(1 / 3)
    # Steps 1-10 give the data=8 run's numbers (float tolerance: reductions in another order).
    for split in ("train", "eval"):
        want = [r["loss"] for r in _rows(nano_gpt_run.out) if r["split"] == split and r["step"] == 10]
        got = [r["loss"] for r in _rows(out) if r["split"] == split and r["step"] == 10]
        np.testing.assert_allclose(got, want, rtol=2e-5)

    # The stage=2 checkpoint restores onto data=8 by its saved logical axes (the stacked model
    # computes as the per-layer one: test_scan_layers_without_a_stage_axis_is_the_same_model).
    mesh = parallel.make_mesh({"data": 8})
    restored = checkpoint.restore(os.path.join(out, "checkpoints"), params_only=True, mesh=mesh, rules="data")
    saved = checkpoint.restore(os.path.join(out, "checkpoints"), params_only=True)
    jax.tree.map(np.testing.assert_array_equal, restored, saved)
    assert restored["blocks"]["mlp"]["w_in"].sharding.is_fully_replicated  # data=8: every device holds them
    # Sampling and export take the per-layer form.
    text = gpt.main([*nano_gpt_run.argv[:-1], "--mesh=stage=2,data=2,fsdp=2", "--microbatches=2", f"--out={out}",
                     "--generate=def ", "--max_new_tokens=8"])
    assert text.startswith("def ")


def test_optimizer_state_follows_the_stage_axis():
    model = models.GPT(dataclasses.replace(CONFIG, scan_layers=True, pipeline_microbatches=2))
    mesh = parallel.make_mesh({"stage": 2, "data": 4})
    state, shardings = parallel.create_sharded_train_state(model, optax.adam(1e-3), _batch()["inputs"], mesh, "data")
    mu = state.opt_state[0].mu["blocks"]["mlp"]["w_in"]
    assert mu.sharding.spec[0] == "stage" and mu.addressable_shards[0].data.shape[0] == CONFIG.num_layers // 2
    norm = state.params["blocks"]["attention_norm"]["RMSNorm_0"]["scale"]
    assert norm.sharding.spec[0] == "stage"  # unannotated block parameters follow the stage axis too
