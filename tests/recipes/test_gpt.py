"""The GPT recipe, shortened: it learns real text, resumes, runs on an FSDP
mesh of 8 devices, and samples from its checkpoint with a KV cache."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

from lepton_jax import models
from recipes import gpt


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_short_run_learns_resumes_and_generates(nano_gpt_run, tmp_path):
    first = nano_gpt_run.result  # 40 steps, trained once for the whole suite
    assert first["steps"] == 40
    assert first["val_bits_per_byte"] < 5.5  # uniform bytes are 8 bits; 40 small steps learn the byte statistics
    rows = _rows(nano_gpt_run.out)
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals[-1]["bits_per_byte"] < evals[0]["bits_per_byte"]
    assert math.isclose(evals[-1]["bits_per_byte"], evals[-1]["loss"] / math.log(2))
    assert all("tokens_per_second" in r for r in rows if r["split"] == "train")
    assert "mesh(data=8) over 8 cpu devices" in nano_gpt_run.stdout  # data=-1 takes all 8 test devices

    # Stopped after step 30: --resume continues from that checkpoint, data
    # position included, and steps 31-40 give the uninterrupted run's numbers.
    out = nano_gpt_run.copy_to(tmp_path / "gpt")
    shutil.rmtree(os.path.join(out, "checkpoints", "40"))
    more = gpt.main([*nano_gpt_run.argv, f"--out={out}", "--resume"])
    assert more["resumed_from"] == 30 and more["steps"] == 40
    last = lambda rows, split: [r for r in rows if r["split"] == split and r["step"] == 40][-1]  # noqa: E731
    for split in ("train", "eval"):
        assert last(_rows(out), split)["loss"] == last(rows, split)["loss"]

    text = gpt.main([*nano_gpt_run.argv, f"--out={out}", "--generate=def ", "--max_new_tokens=20"])
    assert text.startswith("def ") and len(text.encode("utf-8", errors="replace")) >= 20


@pytest.mark.slow
def test_fsdp_mesh_run(gpt_short_flags, tmp_path, capsys):
    # float16 compute with dynamic loss scaling, sharded FSDP over the 8 test devices.
    result = gpt.main([*gpt_short_flags, "--steps=6", "--mesh=data=2,fsdp=4", "--rules=fsdp", "--dtype=float16",
                       f"--out={tmp_path}"])
    assert result["steps"] == 6 and np.isfinite(result["val_bits_per_byte"])
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert all(r["loss_scale"] > 0 for r in rows if r["split"] == "train")
    assert "mesh(data=2, fsdp=4) over 8 cpu devices" in capsys.readouterr().out


@pytest.mark.slow
def test_kv_cache_decoding_matches_full_forward():
    for positions in ("learned", "rotary"):
        config = models.GPTConfig(vocab_size=40, max_len=12, num_layers=2, num_heads=4, num_kv_heads=2,
                                  d_model=32, d_ff=64, positions=positions)
        model = models.GPT(config)
        tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 40)
        params = linen.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])
        forward = jax.jit(model.apply)
        full = forward({"params": params}, tokens)
        cache = jax.jit(lambda key, t: model.init(key, t, decode=True)["cache"])(jax.random.PRNGKey(0), tokens[:, :1])
        jax.tree.map(np.testing.assert_array_equal, models.init_cache(model, 2), cache)
        # One compiled decode step, fed token after token.
        decode = jax.jit(lambda cache, token_Bx1: model.apply({"params": params, "cache": cache}, token_Bx1,
                                                             decode=True, mutable=["cache"]))
        steps = []
        for i in range(tokens.shape[1]):
            logits, updates = decode(cache, tokens[:, i:i + 1])
            cache = updates["cache"]
            steps.append(logits[:, 0])
        np.testing.assert_allclose(jnp.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
        greedy = models.generate(model, params, tokens[:, :4], 5, temperature=0.0)
        assert greedy.shape == (2, 9)
        np.testing.assert_array_equal(greedy[:, :4], tokens[:, :4])
        # Greedy decoding picks the argmax of the full forward at each position.
        np.testing.assert_array_equal(greedy[:, 4], jnp.argmax(forward({"params": params}, greedy[:, :4])[:, -1], -1))


def test_bad_recipe_options():
    with pytest.raises(ValueError, match=r"--config must be one of .*got 'huge'"):
        gpt.main(["--config=huge"])
    with pytest.raises(ValueError, match="--mesh takes name=size pairs"):
        gpt.parse_mesh("data:2")


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """4 steps of the nano GPT on a byte-level pack of the stdlib's json package (5 documents)."""
    from lepton_jax import data

    root = tmp_path_factory.mktemp("packed")
    corpus = os.path.join(os.path.dirname(json.__file__), "*.py")
    data.pack_corpus(data.corpus_files(corpus), "bytes", 33, str(root / "pack"), val_fraction=0.2, progress=False)
    flags = ["--config=nano", f"--data={root / 'pack'}", "--batch_size=8", "--eval_every=4", "--eval_windows=8",
             "--progress=false", f"--out={root / 'run'}"]
    return root, corpus, flags, gpt.main([*flags, "--steps=4"])


@pytest.mark.slow
def test_trains_from_a_packed_corpus(packed_run):
    from lepton_jax import checkpoint

    root, _, flags, first = packed_run
    assert first["val_bits_per_byte"] < math.log2(257)  # below uniform over the pack's 257 ids
    params = checkpoint.restore(str(root / "run" / "checkpoints"), params_only=True)
    assert params["embedding"].shape[0] == 257  # the vocabulary of the pack's tokenizer, end of document included
    with checkpoint.CheckpointManager(str(root / "run" / "checkpoints"), async_save=False) as manager:
        position = manager.extra(4)["data"]  # the Grain loader's, for resume (tests/data/test_records.py)
    assert position["batch_size"] == 8 and "grain" in position
    with pytest.raises(ValueError, match=r"gpt: --seq_len 64 does not match the pack in .*, whose rows of 33 ids "
                                         r"train 32 positions"):
        gpt.main([*flags, "--seq_len=64"])


@pytest.mark.slow
def test_generates_with_the_packs_tokenizer_and_refuses_a_larger_one(packed_run, tmp_path):
    from lepton_jax import data

    root, corpus, flags, _ = packed_run
    text = gpt.main([*flags, "--generate=def ", "--max_new_tokens=8"])  # encoded and decoded by the pack's tokenizer
    assert text.startswith("def ")
    tokenizer = data.train_bpe(data.corpus_files(corpus), 300, str(tmp_path / "tokenizer.json"))
    bpe = tmp_path / "bpe"
    data.pack_corpus(data.corpus_files(corpus), str(tmp_path / "tokenizer.json"), 33, str(bpe), progress=False)
    with pytest.raises(ValueError, match=rf"gpt: the tokenizer of {bpe} has {tokenizer.vocab_size} ids but the model "
                                         r"in .* has a vocabulary of 257"):
        gpt.main([flags[0], f"--data={bpe}", *flags[2:], "--generate=def "])
