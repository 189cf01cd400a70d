"""Hugging Face checkpoints in and out: ``from_hf(dir) -> (model, variables,
tokenizer)``, ``to_hf(model, variables, out_dir)``, and converted
checkpoints (``save_checkpoint``/``load``) for the GPT-2, Llama and BERT
families (``lepton-jax convert``)."""

from lepton_jax import _lazy

_NAMES = {name: "hf" for name in ("from_hf", "to_hf", "load", "save_checkpoint", "read_config", "is_hf_dir",
                                  "hf_tensors", "load_tokenizer")}
__getattr__, __dir__ = _lazy.attach(__name__, submodules=("families", "hf", "gpt2", "llama", "bert"), names=_NAMES)
__all__ = list(_NAMES)
