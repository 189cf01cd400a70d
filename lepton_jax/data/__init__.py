"""Host-side data: in-memory datasets, splits, normalization, resumable
batching, ArrayRecord shards streamed by Grain, pure-jax augmentation, and
the bundled digits dataset."""

from lepton_jax.data.arrays import Normalizer, num_examples, split
from lepton_jax.data.augment import augment_images, mix_inputs, random_crop, random_flip, random_translate
from lepton_jax.data.digits import CLASS_NAMES, load_digits
from lepton_jax.data.loader import BatchIterator, iterate_once
from lepton_jax.data.pack import RowPacker, is_pack, lm_example, pack_corpus, pack_rows, pack_tokenizer, read_pack
from lepton_jax.data.records import (
    ArrayRecords, GrainLoader, InMemoryRecords, RecordWriter, read_metadata, write_array_records,
)
from lepton_jax.data.tokenizers import ByteTokenizer, HFTokenizer, corpus_files, load_tokenizer, train_bpe
from lepton_jax.data.text import TokenWindows, default_corpus_files, eval_windows, load_bytes, split_tokens

__all__ = [
    "ArrayRecords", "augment_images", "BatchIterator", "ByteTokenizer", "CLASS_NAMES", "corpus_files",
    "default_corpus_files", "eval_windows", "GrainLoader", "HFTokenizer", "InMemoryRecords", "is_pack",
    "iterate_once", "lm_example", "load_bytes", "load_digits", "load_tokenizer", "mix_inputs", "Normalizer",
    "num_examples", "pack_corpus", "pack_rows", "pack_tokenizer", "random_crop", "random_flip", "random_translate",
    "read_metadata", "read_pack", "RecordWriter", "RowPacker", "split", "split_tokens", "TokenWindows", "train_bpe",
    "write_array_records",
]
