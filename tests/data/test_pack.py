"""Tokenizers and packing: closed-form rows and segment ids, the pack's
metadata and files, identical reruns, skipped files, one-line CLI errors."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from lepton_jax import cli, data

TEXTS = {
    "a.txt": "def main():\n    return 1\n" * 20,
    "b.txt": "import os\nprint(os.getcwd())\n" * 15,
    "c.txt": "The quick brown fox jumps over the lazy dog. " * 10,
    "d.txt": "héllo wörld ✓\n" * 5,
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in TEXTS.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "empty.txt").write_text("")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    return root


def test_byte_tokenizer_round_trip():
    tokenizer = data.ByteTokenizer()
    ids = tokenizer.encode("héllo ✓")
    assert ids.dtype == np.int32 and list(ids) == list("héllo ✓".encode())
    assert tokenizer.decode(np.append(ids, tokenizer.eod_id)) == "héllo ✓"
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (257, 256)


def test_pack_rows_closed_form():
    inputs, segments = data.pack_rows([np.array([1, 2, 3]), np.array([4, 5])], eod_id=9, seq_len=4)
    np.testing.assert_array_equal(inputs, [[1, 2, 3, 9], [4, 5, 9, 9]])
    np.testing.assert_array_equal(segments, [[1, 1, 1, 1], [1, 1, 1, 0]])
    # A document across rows keeps its tokens in order; each row numbers its documents from 1.
    inputs, segments = data.pack_rows([np.array([1]), np.array([2, 3, 4, 5, 6]), np.array([7])], eod_id=0, seq_len=3)
    np.testing.assert_array_equal(inputs, [[1, 0, 2], [3, 4, 5], [6, 0, 7], [0, 0, 0]])
    np.testing.assert_array_equal(segments, [[1, 1, 2], [1, 1, 1], [1, 1, 2], [1, 0, 0]])


def test_pack_corpus_writes_rows_that_read_back_as_the_documents(corpus, tmp_path):
    out = tmp_path / "packed"
    files = data.corpus_files(str(corpus / "*"))
    metadata = data.pack_corpus(files, "bytes", 64, str(out), shards=2, val_fraction=0.25, progress=False)
    assert {"tokenizer", "seq_len", "documents", "tokens", "rows", "padding_fraction", "shards"} <= set(metadata)
    assert metadata["documents"] == 4 and metadata["tokenizer"] == "bytes" and metadata["seq_len"] == 64
    assert metadata["tokens"] == sum(len(t.encode()) for t in TEXTS.values())  # the documents' own tokens
    assert metadata["skipped"]["empty"]["count"] == 1 and metadata["skipped"]["binary"]["count"] == 1
    # 6 files x 0.25 -> 2 documents (the first in hash order that are not skipped) validate.
    assert metadata["splits"]["val"]["documents"] == 2 and metadata["splits"]["train"]["documents"] == 2
    texts = []
    for split in ("train", "val"):
        rows = data.ArrayRecords(out / split)
        assert len(rows) == metadata["splits"][split]["rows"]
        inputs = np.stack([rows[i]["inputs"] for i in range(len(rows))]).reshape(-1)
        segments = np.stack([rows[i]["segment_ids"] for i in range(len(rows))]).reshape(-1)
        stream = inputs[segments > 0]
        documents = [d[d != 256] for d in np.split(stream, np.where(stream == 256)[0] + 1)]
        texts += [bytes(d.astype(np.uint8)).decode() for d in documents if len(d)]
    assert sorted(texts) == sorted(TEXTS.values())
    rows_total = metadata["rows"] * 64
    assert metadata["padding_fraction"] == pytest.approx(
        (rows_total - metadata["tokens"] - metadata["documents"]) / rows_total)
    # Again: identical files.
    again = tmp_path / "again"
    data.pack_corpus(files, "bytes", 64, str(again), shards=2, val_fraction=0.25, progress=False)
    for split in ("train", "val"):
        for name in sorted(os.listdir(out / split)):
            assert hashlib.sha256((out / split / name).read_bytes()).digest() == \
                hashlib.sha256((again / split / name).read_bytes()).digest()


def test_bpe_tokenizer_trained_on_the_corpus_and_used_by_the_pack(corpus, tmp_path, capsys):
    path = tmp_path / "tok" / "tokenizer.json"
    assert cli.main(["data", "tokenizer", "--corpus", str(corpus / "*.txt"), "--vocab-size", "300",
                     "--out", str(path)]) == 0
    tokenizer = data.load_tokenizer(str(path))
    assert tokenizer.vocab_size == 300 and tokenizer.decode(tokenizer.encode(TEXTS["d.txt"])) == TEXTS["d.txt"]
    assert len(tokenizer.encode(TEXTS["a.txt"])) < len(TEXTS["a.txt"])  # merges learned
    out = tmp_path / "packed"
    assert cli.main(["data", "pack", "--corpus", str(corpus / "*"), "--tokenizer", str(path), "--seq-len", "32",
                     "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["documents"] == 4 and summary["skipped"] == {"empty": 1, "binary": 1}
    packed = data.pack_tokenizer(str(out))
    assert packed.vocab_size == 300 and packed.eod_id == tokenizer.eod_id
    assert summary["tokens"] == sum(len(tokenizer.encode(t)) for t in TEXTS.values())


def test_bad_input_is_one_line(tmp_path, capsys):
    cases = [
        (["data", "pack", "--corpus", str(tmp_path / "none*"), "--seq-len", "8", "--out", str(tmp_path / "o")],
         "lepton-jax data pack: corpus: "),
        (["data", "pack", "--corpus", __file__, "--seq-len", "1", "--out", str(tmp_path / "o")],
         "lepton-jax data pack: pack: --seq-len must be an int >= 2, got 1"),
        (["data", "pack", "--corpus", __file__, "--seq-len", "8", "--tokenizer", str(tmp_path / "t.json"),
          "--out", str(tmp_path / "o")], "lepton-jax data pack: tokenizer: "),
        (["data", "tokenizer", "--corpus", __file__, "--vocab-size", "10", "--out", str(tmp_path / "t.json")],
         "lepton-jax data tokenizer: tokenizer: --vocab-size must be an int above the 256 byte symbols, got 10"),
    ]
    for args, message in cases:
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    (tmp_path / "no_eod.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}')
    with pytest.raises(ValueError, match="has no end-of-document token"):
        data.load_tokenizer(str(tmp_path / "no_eod.json"))


def test_lm_example_masks_targets_across_documents_and_padding():
    inputs, segments = data.pack_rows([np.array([1, 2]), np.array([3, 4, 5])], eod_id=9, seq_len=8)
    example = data.lm_example({"inputs": inputs[0], "segment_ids": segments[0]})
    # row: 1 2 9 | 3 4 5 9 | pad(9) ; segments 1 1 1 2 2 2 2 0
    np.testing.assert_array_equal(example["inputs"], [1, 2, 9, 3, 4, 5, 9])
    np.testing.assert_array_equal(example["targets"], [2, 9, -100, 4, 5, 9, -100])
    np.testing.assert_array_equal(example["segment_ids"], [1, 1, 1, 2, 2, 2, 2])
