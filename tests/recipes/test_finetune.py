"""recipes.finetune: LoRA and full fine-tuning of a converted Llama-family decoder
(on text and on a packed corpus)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

from lepton_jax import convert, data, lora, models
from recipes import finetune

# Fine-tuning runs: several seconds each.
pytestmark = pytest.mark.slow

TEXT = ("def add(a, b):\n    return a + b\n\n" * 40 + "class Point:\n    x: int = 0\n    y: int = 0\n\n" * 40)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A Llama-family decoder written as a Hugging Face directory, with a BPE tokenizer."""
    from lepton_jax.data.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("finetune")
    (root / "text.txt").write_text(TEXT)
    tokenizer = train_bpe([str(root / "text.txt")], 320, root / "tokenizer.json")
    config = models.GPTConfig(vocab_size=320, max_len=64, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                              d_ff=64, positions="rotary", mlp="swiglu", norm="rms", tie_embeddings=False)
    model = models.GPT(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    convert.to_hf(model, {"params": linen.meta.unbox(params)}, root / "hf", tokenizer=tokenizer)
    # The same text as a packed corpus of four documents (rows of 33 ids: 32 trained positions).
    for i in range(4):
        (root / f"doc{i}.txt").write_text(TEXT[i * 400:(i + 1) * 400 + 800])
    data.pack_corpus([str(root / f"doc{i}.txt") for i in range(4)], str(root / "hf" / "tokenizer.json"), 33,
                     str(root / "pack"), val_fraction=0.25, progress=False)
    return root


def _run(base, tmp_path, *extra: str, data_path: str = "text.txt") -> dict:
    out = tmp_path / "run"
    code = finetune.main(["--base", str(base / "hf"), "--data", str(base / data_path), "--steps", "8",
                          "--batch-size", "4", "--seq-len", "32", "--eval_every", "4", "--eval_windows", "4",
                          "--out", str(out), "--progress=false", "--max_bytes", "4000", *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("base_dtype, data_path", [("float32", "text.txt"), ("int8", "pack")])
def test_lora_trains_adapters_only_and_exports_merged(base, tmp_path, base_dtype, data_path):
    summary = _run(base, tmp_path, "--lora-rank", "4", "--base-dtype", base_dtype, "--export-hf",
                   str(tmp_path / "merged"), data_path=data_path)
    # Rank 4 on q, k, v (GQA: 16 out), out, gate, in, out of 2 layers: (in + out) * 4 per weight.
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert summary["trainable_params"] == 2 * per_layer < summary["total_params"]
    assert summary["val_bits_per_byte"] < summary["val_bits_per_byte_before"]
    assert summary["compiled_peak_bytes"] > 0
    adapters, config, metadata = lora.load_adapters(tmp_path / "run" / "adapters")
    assert config.rank == 4 and metadata["base"] == str(base / "hf")
    # The merged export is base + adapters.
    model, variables, _ = convert.from_hf(base / "hf")
    merged_model, merged, tokenizer = convert.from_hf(tmp_path / "merged")
    assert tokenizer is not None
    ids = jnp.asarray(np.arange(12)[None] % 320)
    frozen = lora.freeze(variables["params"], base_dtype)
    expected = jax.jit(lora.LoRA(model, config).apply)({"params": adapters, "base": frozen}, ids)
    np.testing.assert_allclose(jax.jit(merged_model.apply)(merged, ids), expected, atol=1e-5)


def test_full_fine_tuning_trains_every_weight(base, tmp_path):
    summary = _run(base, tmp_path, "--full")
    assert summary["trainable_params"] == summary["total_params"]
    assert summary["val_bits_per_byte"] < summary["val_bits_per_byte_before"]
    model, variables, _ = convert.load(tmp_path / "run" / "checkpoint")
    before = convert.from_hf(base / "hf")[1]
    assert not np.allclose(variables["params"]["block_0"]["mlp"]["w_in"], before["params"]["block_0"]["mlp"]["w_in"])


def test_bad_arguments_are_one_line(base, tmp_path, capsys):
    assert finetune.main(["--base", str(tmp_path / "missing")]) == 2
    assert finetune.main(["--base", str(base / "hf"), "--base-dtype", "int4"]) == 2
    assert finetune.main(["--base", str(base / "hf"), "--steps", "0"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "no such directory" in errors[0] and "int4" in errors[1] and "--steps" in errors[2]
