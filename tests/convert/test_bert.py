"""BERT checkpoints in and out, against transformers itself.

transformers builds one small random ``BertModel`` (weights drawn wider than
its default so outputs differ by more than float noise) and saves it with a
WordPiece tokenizer built here; our hidden states, pooler output, gradients
and tokenization must equal its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lepton_jax import convert, models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# transformers models built, saved and compared: several seconds each.
pytestmark = pytest.mark.slow

VOCAB = 100
TEXTS = ["The quick brown fox", "hello world", "the lazy dog sat on the mat with a cat and a fox",
         "zebra jumps", "", "Pack my box with five dozen liquor jugs"]


def hf_config(**overrides):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
                                   **overrides)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, write_bert_tokenizer) -> str:
    """A saved random transformers BertModel with its tokenizer.json."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    transformers.BertModel(hf_config()).eval().save_pretrained(root / "bert")
    write_bert_tokenizer(root / "bert" / "tokenizer.json")
    return str(root / "bert")


@pytest.fixture(scope="module")
def converted(hf_dir):
    return convert.from_hf(hf_dir)


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Two rows of real tokens then padding, one with a second segment (token type 1)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(5, VOCAB, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 6:] = 1
    types[1, 4:7] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _hf_outputs(directory: str, inputs: dict[str, np.ndarray], dtype=None, model_class=None):
    model = (model_class or transformers.BertModel).from_pretrained(directory, dtype=dtype or torch.float32).eval()
    with torch.no_grad():
        out = model(**{k: torch.tensor(v).long() for k, v in inputs.items()})
    pooled = None if out.pooler_output is None else out.pooler_output.float().numpy()
    return out.last_hidden_state.float().numpy(), pooled


def _ours(model, variables, inputs, **kwargs) -> np.ndarray:
    ids, rest = inputs["input_ids"], {k: v for k, v in inputs.items() if k != "input_ids"}
    return np.asarray(jax.jit(lambda v, i, r: model.apply(v, i, **r, **kwargs))(variables, ids, rest))


def _close_real(ours, theirs, mask, tol=1e-4) -> None:
    """Equal at the real (unpadded) positions."""
    real = mask.astype(bool)
    assert np.abs(theirs[real]).max() > 0.5
    np.testing.assert_allclose(ours[real], theirs[real], atol=tol, rtol=0)


def test_hidden_states_and_pooler_match_transformers(hf_dir, converted):
    model, variables, _ = converted
    assert model.config.pooler and model.config.activation == "gelu" and model.config.norm_eps == 1e-12
    inputs = _inputs()
    hidden, pooled = _hf_outputs(hf_dir, inputs)
    ours = _ours(model, variables, inputs)
    assert ours.dtype == np.float32 and ours.shape == (3, 12, 32)
    _close_real(ours, hidden, inputs["attention_mask"])
    ours_pooled = _ours(model, variables, inputs, return_pooled=True)
    assert ours_pooled.shape == (3, 32)
    np.testing.assert_allclose(ours_pooled, pooled, atol=1e-4, rtol=0)
    # Without a mask or token types the defaults are transformers' (all real, all type 0).
    ids = inputs["input_ids"][:1]
    theirs, _ = _hf_outputs(hf_dir, {"input_ids": ids})
    np.testing.assert_allclose(np.asarray(model.apply(variables, ids)), theirs, atol=1e-4, rtol=0)


def test_gradients_match_torch_autograd(hf_dir, converted):
    model, variables, _ = converted
    inputs = _inputs(seed=1)
    weights = np.random.RandomState(2).randn(3, 12, 32).astype(np.float32) * inputs["attention_mask"][..., None]

    def scalar(params):
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        return jnp.sum(model.apply({"params": params}, inputs["input_ids"], **rest) * weights)

    value, grads = jax.jit(jax.value_and_grad(scalar))(variables["params"])
    hf = transformers.BertModel.from_pretrained(hf_dir).eval()
    out = hf(**{k: torch.tensor(v).long() for k, v in inputs.items()})
    theirs = (out.last_hidden_state * torch.tensor(weights)).sum()
    theirs.backward()
    np.testing.assert_allclose(float(value), theirs.item(), rtol=1e-5, atol=1e-4)
    layer = hf.encoder.layer[1]
    pairs = [(grads["word_embeddings"], hf.embeddings.word_embeddings.weight.grad),
             (grads["position_embeddings"], hf.embeddings.position_embeddings.weight.grad),
             (grads["token_type_embeddings"], hf.embeddings.token_type_embeddings.weight.grad),
             (grads["block_1"]["attention"]["query"], layer.attention.self.query.weight.grad.T.reshape(32, 4, 8)),
             (grads["block_1"]["attention"]["value_bias"], layer.attention.self.value.bias.grad.reshape(4, 8)),
             (grads["block_1"]["mlp"]["w_out"], layer.output.dense.weight.grad.T),
             (grads["block_0"]["mlp_norm"]["scale"], hf.encoder.layer[0].output.LayerNorm.weight.grad)]
    for ours, reference in pairs:
        reference = reference.numpy()
        assert np.abs(reference).max() > 0
        np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4 * np.abs(reference).max(), rtol=1e-3)


def test_to_hf_round_trip_gives_transformers_the_same_outputs(hf_dir, converted, tmp_path):
    model, variables, tokenizer = converted
    out = convert.to_hf(model, variables, tmp_path / "out", tokenizer=tokenizer,
                        base_config=convert.read_config(hf_dir))
    config = convert.read_config(out)
    assert config["architectures"] == ["BertModel"] and config["add_pooling_layer"] is True
    inputs = _inputs(seed=3)
    for ours, theirs in zip(_hf_outputs(out, inputs), _hf_outputs(hf_dir, inputs), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def _edit_weights(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    tensors = edit(tensors) or tensors
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_prefixed_checkpoint_with_buffers_loads(hf_dir, tmp_path):
    """A BertFor* file names every tensor ``bert.*``; older ones also save the index buffers."""
    def prefixed(tensors):
        out = {f"bert.{name}": array for name, array in tensors.items()}
        out["bert.embeddings.position_ids"] = np.arange(64)[None]
        return out

    model, variables, _ = convert.from_hf(_edit_weights(hf_dir, tmp_path / "prefixed", prefixed))
    inputs = _inputs()
    _close_real(_ours(model, variables, inputs), _hf_outputs(hf_dir, inputs)[0], inputs["attention_mask"])


def test_masked_lm_head_is_an_unexpected_tensor(tmp_path):
    torch.manual_seed(1)
    transformers.BertForMaskedLM(hf_config()).save_pretrained(tmp_path / "mlm")
    # The encoder is read (prefix stripped, no pooler), but its MLM head would be dropped: an error names it.
    with pytest.raises(ValueError, match=r"unexpected tensor.*'cls\.predictions\.bias' \(100,\)"):
        convert.from_hf(tmp_path / "mlm")


def test_checkpoint_without_pooler_loads_and_round_trips(tmp_path):
    torch.manual_seed(1)
    mlm = transformers.BertForMaskedLM(hf_config()).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    # The MLM encoder without its head: prefixed, no pooler tensors.
    encoder = _edit_weights(str(tmp_path / "mlm"), tmp_path / "encoder",
                            lambda t: {k: v for k, v in t.items() if not k.startswith("cls.")})
    model, variables, _ = convert.from_hf(encoder)
    assert not model.config.pooler and "pooler" not in variables["params"]
    inputs = _inputs()
    with torch.no_grad():
        theirs = mlm.bert(**{k: torch.tensor(v).long() for k, v in inputs.items()}).last_hidden_state.numpy()
    _close_real(_ours(model, variables, inputs), theirs, inputs["attention_mask"])
    with pytest.raises(ValueError, match="return_pooled=True needs a pooler"):
        model.apply(variables, inputs["input_ids"], return_pooled=True)
    out = convert.to_hf(model, variables, tmp_path / "out")
    assert not any(name.startswith("pooler.") for name in load_file(os.path.join(out, "model.safetensors")))
    again, _, _ = convert.from_hf(out)
    assert not again.config.pooler


def test_bad_checkpoints_name_the_tensor(hf_dir, tmp_path):
    name = "encoder.layer.1.attention.self.key.weight"
    missing = _edit_weights(hf_dir, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=rf"missing tensor.*'{name}' \(32, 32\)"):
        convert.from_hf(missing)
    extra = _edit_weights(hf_dir, tmp_path / "extra", lambda t: t.update({"encoder.adapter.weight": t[name]}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*'encoder.adapter.weight' \(32, 32\)"):
        convert.from_hf(extra)
    shape = _edit_weights(hf_dir, tmp_path / "shape", lambda t: t.update({name: t[name][:8]}))
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(8, 32\) but config.json gives \(32, 32\)"):
        convert.from_hf(shape)
    config = convert.read_config(hf_dir)
    for key, value in [("position_embedding_type", "relative_key"), ("is_decoder", True),
                       ("add_cross_attention", True), ("hidden_act", "gelu_10")]:
        bad = tmp_path / f"bad_{key}"
        shutil.copytree(hf_dir, bad)
        (bad / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=rf"config.json {key}={value!r} is not supported"):
            convert.from_hf(bad)


def test_bf16_weights_load(hf_dir, tmp_path):
    transformers.BertModel.from_pretrained(hf_dir).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, variables, _ = convert.from_hf(tmp_path / "bf16")
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    model, variables, _ = convert.from_hf(tmp_path / "bf16", dtype=jnp.float32)
    inputs = _inputs()
    # The same bf16-rounded weights computed in fp32 on both sides.
    theirs, _ = _hf_outputs(str(tmp_path / "bf16"), inputs, dtype=torch.float32)
    _close_real(_ours(model, variables, inputs), theirs, inputs["attention_mask"])
    # Computing in bf16 (params kept fp32) stays near, and still returns fp32.
    bf16 = model.clone(config=dataclasses.replace(model.config, dtype=jnp.bfloat16))
    low = _ours(bf16, variables, inputs)
    assert low.dtype == np.float32
    _close_real(low, theirs, inputs["attention_mask"], tol=0.1)


def test_encoder_rejects_bad_inputs(converted):
    model, variables, _ = converted
    ids = np.zeros((2, 5), np.int32)
    cases = [((ids.astype(np.float32),), {}, "input_ids must be integer \\[batch, seq\\], got float32 \\(2, 5\\)"),
             ((ids[0],), {}, "input_ids must be integer \\[batch, seq\\], got int32 \\(5,\\)"),
             ((ids,), {"attention_mask": np.ones((2, 4))},
              "attention_mask must have the input_ids' shape \\(2, 5\\), got \\(2, 4\\)"),
             ((ids,), {"token_type_ids": np.zeros((1, 5), np.int32)}, "token_type_ids must have the input_ids' shape"),
             ((np.zeros((1, 65), np.int32),), {}, "sequence length 65 exceeds max_len 64")]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=f"BertEncoder: {message}"):
            model.apply(variables, *args, **kwargs)


def test_mean_pool_averages_real_tokens_and_gives_zeros_for_empty_rows():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    pooled = np.asarray(models.mean_pool(hidden, np.array([[1, 1, 0], [0, 0, 0]])))
    np.testing.assert_array_equal(pooled, [[1.0, 2.0], [0.0, 0.0]])
    assert np.isfinite(np.asarray(jax.grad(lambda h: models.mean_pool(h, np.zeros((2, 3))).sum())(hidden))).all()
    with pytest.raises(ValueError, match="mean_pool: need hidden"):
        models.mean_pool(hidden, np.ones((2, 4)))


def test_encode_batch_matches_transformers_fast_tokenizer(hf_dir):
    _, _, tokenizer = convert.from_hf(hf_dir)
    assert tokenizer.eod_id is None  # BERT's tokenizer has no end-of-document token
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"),
                                                  pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                                  sep_token="[SEP]", mask_token="[MASK]")
    for max_length in (None, 6):
        ours = tokenizer.encode_batch(TEXTS, max_length=max_length)
        expected = theirs(TEXTS, padding=True, truncation=max_length is not None, max_length=max_length,
                          return_token_type_ids=True, return_tensors="np")
        assert set(ours) == {"input_ids", "attention_mask", "token_type_ids"}
        for key, value in ours.items():
            assert value.dtype == np.int32
            np.testing.assert_array_equal(value, expected[key])
    batch = tokenizer.encode_batch(TEXTS)
    assert batch["input_ids"][4].tolist()[:3] == [2, 3, 0]  # "": [CLS] [SEP] then padding
    assert tokenizer.encode("the fox").tolist() == theirs("the fox", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        tokenizer.encode_batch(TEXTS, max_length=0)
    with pytest.raises(ValueError, match="packing puts between documents"):
        from lepton_jax.data import RowPacker

        RowPacker(tokenizer.eod_id, 8)
