"""GPT-2 and Llama checkpoints in and out, against transformers itself.

transformers builds small random models (weights drawn wider than its
default so that logits differ by more than float noise) and saves them;
our logits, greedy generations and gradients must equal its own.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lepton_jax import convert
from lepton_jax.cli import main as cli_main
from lepton_jax.models import generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# transformers models built, saved and compared: several seconds each.
pytestmark = pytest.mark.slow

VOCAB = 300  # a byte-level BPE tokenizer trained below has this many ids
TEXT = "the quick brown fox jumps over the lazy dog. " * 20 + "pack my box with five dozen liquor jugs. " * 20


def _hf_model(kind: str):
    common = dict(vocab_size=VOCAB, initializer_range=0.2)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                         eos_token_id=0, **common)
        return transformers.GPT2LMHeadModel(config)
    # Llama 3 style: GQA, llama3 rotary scaling (short original context so it bites), untied or tied head.
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                                      tie_word_embeddings=kind == "llama_tied", bos_token_id=0, eos_token_id=0,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                      rope_theta=5000.0, **common)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A saved transformers model per family, with a tokenizer.json."""
    from lepton_jax.data.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("hf")
    (root / "corpus.txt").write_text(TEXT)
    tokenizer = train_bpe([str(root / "corpus.txt")], VOCAB, root / "tokenizer.json")
    assert tokenizer.vocab_size <= VOCAB
    torch.manual_seed(0)
    dirs = {}
    for kind in ("gpt2", "llama", "llama_tied"):
        model = _hf_model(kind).eval()
        model.save_pretrained(root / kind)
        shutil.copy(root / "tokenizer.json", root / kind / "tokenizer.json")
        dirs[kind] = str(root / kind)
    return dirs


def _hf_logits(directory: str, ids: np.ndarray, dtype=None) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _ids(batch: int = 2, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def _logits(model, variables, ids: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids)))


def _close(ours, theirs, tol: float = 1e-4) -> None:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert np.abs(theirs).max() > 0.5  # the comparison is not between near-zero logits
    np.testing.assert_allclose(ours, theirs, atol=tol * max(1.0, np.abs(theirs).max()), rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama_tied"])
def test_logits_match_transformers(hf_dirs, kind):
    model, variables, tokenizer = convert.from_hf(hf_dirs[kind])
    ids = _ids()
    _close(_logits(model, variables, ids), _hf_logits(hf_dirs[kind], ids))
    # The tokenizer comes along and encodes as transformers' fast tokenizer does.
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dirs[kind])
    assert list(tokenizer.encode("the lazy fox")) == theirs("the lazy fox", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_generation_matches_with_our_kv_cache(hf_dirs, kind):
    model, variables, _ = convert.from_hf(hf_dirs[kind])
    prompt = _ids(batch=2, length=5, seed=1)
    ours = np.asarray(generate(model, variables["params"], prompt, 20, temperature=0.0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[kind]).eval()
    hf.generation_config.eos_token_id = None  # 20 tokens, no early stop
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False, pad_token_id=0).numpy()
    assert ours.shape == theirs.shape == (2, 25)
    np.testing.assert_array_equal(ours, theirs)


def test_gradients_match_torch_autograd(hf_dirs):
    model, variables, _ = convert.from_hf(hf_dirs["llama"])
    ids = _ids(batch=2, length=16)

    def loss(params):
        logits = model.apply({"params": params}, jnp.asarray(ids[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(ids[:, 1:, None]), -1))

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"]).eval()
    out = hf(torch.tensor(ids[:, :-1])).logits
    torch_loss = torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), torch.tensor(ids[:, 1:]).reshape(-1))
    torch_loss.backward()
    np.testing.assert_allclose(float(value), torch_loss.item(), rtol=1e-5)
    layer = hf.model.layers[1]
    pairs = [(grads["block_1"]["attention"]["query"], layer.self_attn.q_proj.weight.grad.numpy().T.reshape(32, 4, 8)),
             (grads["block_1"]["mlp"]["w_out"], layer.mlp.down_proj.weight.grad.numpy().T),
             (grads["head"], hf.lm_head.weight.grad.numpy().T),
             (grads["embedding"], hf.model.embed_tokens.weight.grad.numpy())]
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5 * np.abs(theirs).max() + 1e-8, rtol=1e-3)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_to_hf_round_trip_gives_transformers_the_same_logits(hf_dirs, kind, tmp_path):
    model, variables, tokenizer = convert.from_hf(hf_dirs[kind])
    out = convert.to_hf(model, variables, tmp_path / "out", tokenizer=tokenizer,
                        base_config=convert.read_config(hf_dirs[kind]))
    ids = _ids(seed=2)
    np.testing.assert_array_equal(_hf_logits(out, ids), _hf_logits(hf_dirs[kind], ids))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_older_rope_config_layout_reads_the_same(hf_dirs, tmp_path):
    """Most Hub files carry top-level rope_theta/rope_scaling, not transformers 5's rope_parameters."""
    old = tmp_path / "old"
    shutil.copytree(hf_dirs["llama"], old)
    config = json.loads((old / "config.json").read_text())
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    config["rope_scaling"] = {**parameters, "type": parameters.pop("rope_type")}
    (old / "config.json").write_text(json.dumps(config))
    model, variables, _ = convert.from_hf(old)
    assert model.config.rope_theta == 5000.0 and model.config.rope_scaling.original_max_len == 16
    ids = _ids(length=40)  # past the original 16 positions: the scaling shows
    _close(_logits(model, variables, ids), _hf_logits(hf_dirs["llama"], ids))


def test_sharded_and_bf16_checkpoints_load(hf_dirs, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    ids = _ids(seed=3)
    model, variables, _ = convert.from_hf(tmp_path / "sharded")
    _close(_logits(model, variables, ids), _hf_logits(hf_dirs["llama"], ids))

    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, variables, _ = convert.from_hf(tmp_path / "bf16")
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    model, variables, _ = convert.from_hf(tmp_path / "bf16", dtype=jnp.float32)
    # The same bf16-rounded weights computed in fp32 on both sides.
    _close(_logits(model, variables, ids), _hf_logits(str(tmp_path / "bf16"), ids, torch.float32))


def test_restores_straight_onto_a_mesh(hf_dirs):
    from lepton_jax.parallel import make_mesh

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    model, variables, _ = convert.from_hf(hf_dirs["llama"], mesh=mesh, rules="fsdp_tensor")
    query = variables["params"]["block_0"]["attention"]["query"]
    assert query.sharding.mesh.shape == mesh.shape and not query.sharding.is_fully_replicated
    ids = _ids(seed=4)
    _close(jax.jit(model.apply)(variables, jnp.asarray(ids)), _hf_logits(hf_dirs["llama"], ids))


def _edit_weights(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_bad_checkpoints_name_the_tensor(hf_dirs, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    missing = _edit_weights(hf_dirs["llama"], tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensor.*'{name}' \(16, 32\)"):
        convert.from_hf(missing)
    extra = _edit_weights(hf_dirs["llama"], tmp_path / "extra", lambda t: t.update({"model.adapter.weight": t[name]}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*'model.adapter.weight' \(16, 32\)"):
        convert.from_hf(extra)
    shape = _edit_weights(hf_dirs["llama"], tmp_path / "shape", lambda t: t.update({name: t[name][:8]}))
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(8, 32\) but config.json gives \(16, 32\)"):
        convert.from_hf(shape)
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='t5'"):
        convert.from_hf(other)
    config = json.loads(open(os.path.join(hf_dirs["llama"], "config.json")).read())
    for key, value, message in [("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
                                ("rope_parameters", {"rope_type": "yarn", "factor": 2.0}, "rope type 'yarn'")]:
        bad = tmp_path / f"bad_{key}"
        shutil.copytree(hf_dirs["llama"], bad)
        (bad / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            convert.from_hf(bad)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.from_hf(tmp_path)


def test_cli_round_trip_through_an_ordinary_checkpoint(hf_dirs, tmp_path, capsys):
    import orbax.checkpoint as ocp

    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert cli_main(["convert", "--from-hf", hf_dirs["gpt2"], "--out", str(ckpt)]) == 0
    # Plain Orbax reads the parameters; the tokenizer sits beside the steps.
    with ocp.PyTreeCheckpointer() as reader:
        state = reader.restore(str(ckpt / "0" / "state"))
    assert state["params"]["embedding"].shape == (VOCAB, 32)
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    model, variables, tokenizer = convert.load(ckpt)
    assert tokenizer is not None and model.config.use_bias
    assert cli_main(["convert", "--to-hf", str(ckpt), "--out", str(back)]) == 0
    ids = _ids(seed=5)
    np.testing.assert_array_equal(_hf_logits(str(back), ids), _hf_logits(hf_dirs["gpt2"], ids))
    capsys.readouterr()
    assert cli_main(["convert", "--to-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such checkpoint directory" in err
    assert cli_main(["convert", "--from-hf", hf_dirs["gpt2"], "--out", str(ckpt)]) == 2
    assert "already exists" in capsys.readouterr().err
