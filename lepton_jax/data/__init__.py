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
    "ArrayRecords", "BatchIterator", "ByteTokenizer", "GrainLoader", "HFTokenizer", "corpus_files", "load_tokenizer",
    "RecordWriter", "RowPacker", "is_pack", "lm_example", "pack_corpus", "pack_rows", "pack_tokenizer", "read_pack", "train_bpe", "InMemoryRecords", "read_metadata", "write_array_records", "CLASS_NAMES", "Normalizer", "augment_images", "iterate_once", "load_digits", "mix_inputs",
    "TokenWindows", "default_corpus_files", "eval_windows", "load_bytes", "num_examples", "random_crop",
    "random_flip", "random_translate", "split", "split_tokens",
]
