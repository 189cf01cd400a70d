"""The embedding recipe: a file of texts to mean-pooled BERT vectors, against
transformers' own tokenizer, model and masked mean."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lepton_jax import convert
from lepton_jax.models.embedding import embed_texts
from recipes import embed

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# transformers models built, saved and compared: several seconds each.
pytestmark = pytest.mark.slow

# Six texts (one empty) in batches of 4: the second batch is padded to 4 rows.
TEXTS = ["The quick brown fox", "hello world", "the lazy dog sat on the mat with a cat and a fox", "zebra jumps", "",
         "Pack my box with five dozen liquor jugs"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, write_bert_tokenizer) -> str:
    """A saved random transformers BertModel with its tokenizer.json."""
    root = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(root / "bert")
    write_bert_tokenizer(root / "bert" / "tokenizer.json")
    return str(root / "bert")


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")  # the final newline starts no text
    return str(path)


@pytest.fixture(scope="module")
def expected(hf_dir) -> np.ndarray:
    """transformers' last hidden states averaged over each text's real tokens."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"),
                                                     pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                                     sep_token="[SEP]")
    batch = tokenizer(TEXTS, padding=True, return_token_type_ids=True, return_tensors="pt")
    model = transformers.BertModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def test_recipe_matches_transformers_mean_pooling(hf_dir, texts_file, expected, tmp_path, capsys):
    out = tmp_path / "embeddings.npy"
    assert embed.main(["--base", hf_dir, "--texts", texts_file, "--out", str(out), "--batch-size", "4"]) == 0
    assert "embedded 6 texts as 32-d vectors" in capsys.readouterr().out
    ours = np.load(out)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 32)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    normalized = tmp_path / "normalized.npy"
    assert embed.main(["--base", hf_dir, "--texts", texts_file, "--out", str(normalized), "--batch-size", "4",
                       "--normalize"]) == 0
    unit = np.load(normalized)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-4)


def test_batches_share_one_compilation_and_a_converted_checkpoint_embeds_the_same(hf_dir, expected, tmp_path,
                                                                                    caplog):
    model, variables, tokenizer = convert.from_hf(hf_dir)
    # Both batches of 5 (the second padded from 1 row) have 16 token slots: one program serves them.
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        ours = embed_texts(model, variables, tokenizer, TEXTS, batch_size=5)
    compiles = [r for r in caplog.records if "Compiling jit(_pooled_batch)" in r.getMessage()]
    assert len(compiles) == 1
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    ckpt = convert.save_checkpoint(model, variables, tmp_path / "ckpt", tokenizer=tokenizer,
                                   base_config=convert.read_config(hf_dir))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:3]), encoding="utf-8")  # no final newline: still three texts
    out = tmp_path / "from_ckpt.npy"
    assert embed.main(["--base", ckpt, "--texts", str(texts), "--out", str(out), "--max-length", "64"]) == 0
    np.testing.assert_allclose(np.load(out), ours[:3], atol=1e-6, rtol=0)
    # Truncation keeps [CLS] ... [SEP]: the first 5 tokens of the long text, as transformers cuts them.
    cut = embed_texts(model, variables, tokenizer, TEXTS[2:3], max_length=5)
    assert cut.shape == (1, 32) and not np.allclose(cut, ours[2:3], atol=1e-3)


def test_a_sentence_transformers_model_gives_its_own_vectors(hf_dir, texts_file, tmp_path):
    """The home library of sentence-embedding models, loading the same directory."""
    import json
    import shutil

    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer import modules as st_models
    directory = tmp_path / "st"
    shutil.copytree(hf_dir, directory / "encoder")
    (directory / "encoder" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **{f"{k}_token": f"[{k.upper()}]" for k in
                                                          ("pad", "unk", "cls", "sep", "mask")}}))
    word = st_models.Transformer(str(directory / "encoder"))
    modules = [word, st_models.Pooling(word.get_embedding_dimension(), pooling_mode="mean"), st_models.Normalize()]
    st.SentenceTransformer(modules=modules, device="cpu").save(str(directory / "saved"))
    theirs = st.SentenceTransformer(str(directory / "saved"), device="cpu").encode(TEXTS, batch_size=4)
    out = tmp_path / "ours.npy"
    assert embed.main(["--base", str(directory / "saved"), "--texts", texts_file, "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), theirs, atol=1e-5, rtol=0)  # normalized, as its Normalize module does
    # A model that pools otherwise (its [CLS] vector) is refused, not mean-pooled.
    (directory / "saved" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    assert embed.main(["--base", str(directory / "saved"), "--texts", texts_file, "--out", str(out)]) == 2


def test_bad_arguments_are_one_line_with_exit_status_2(hf_dir, texts_file, tmp_path, capsys, subprocess_env):
    out = str(tmp_path / "o.npy")
    cases = [([], "the following arguments are required: --base, --texts, --out"),
             (["--base", str(tmp_path / "none"), "--texts", texts_file, "--out", out], "is not a directory"),
             (["--base", hf_dir, "--texts", str(tmp_path / "none.txt"), "--out", out], "--texts: "),
             (["--base", hf_dir, "--texts", texts_file, "--out", out, "--batch-size", "0"],
              "--batch-size must be >= 1"),
             (["--base", hf_dir, "--texts", texts_file, "--out", out, "--batch-size", "x"], "invalid int value: 'x'"),
             (["--base", hf_dir, "--texts", texts_file, "--out", out, "--max-length", "65"],
              "max_length 65 exceeds the model's max_len 64"),
             (["--base", str(tmp_path), "--texts", texts_file, "--out", out],
              "is not a readable converted checkpoint (and has no config.json): ")]
    for argv, message in cases:
        assert embed.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("python -m recipes.embed: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(out)
    # As a command: the same one line, exit status 2.
    result = subprocess.run([sys.executable, "-m", "recipes.embed", "--base", hf_dir], capture_output=True, text=True,
                            env=subprocess_env, timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "the following arguments are required: --texts, --out" in result.stderr
