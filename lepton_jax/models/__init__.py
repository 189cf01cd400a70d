"""Reference models built from ``lepton_jax.nn`` and ``lepton_jax.ops``."""

from lepton_jax.models.bert import BertConfig, BertEncoder, mean_pool
from lepton_jax.models.classifiers import CNN, LSTMClassifier, MLPClassifier
from lepton_jax.models import pipeline
from lepton_jax.models.gpt import (GPT, GPT_QUANTIZED_MODULES, GPTConfig, LMHead, RopeScaling, generate, init_cache,
                                   lm_loss, stack_layers, unstack_layers)

__all__ = ["BertConfig", "BertEncoder", "CNN", "GPT", "GPTConfig", "GPT_QUANTIZED_MODULES", "LMHead", "LSTMClassifier",
           "MLPClassifier", "RopeScaling", "generate", "init_cache", "lm_loss", "mean_pool", "pipeline", "stack_layers",
           "unstack_layers"]
