"""Layers as ``flax.linen`` modules (pure ``init``/``apply``), thin over ``lepton_jax.ops``."""

from lepton_jax.nn.axes import logical_param
from lepton_jax.nn.conv import Conv
from lepton_jax.nn.dropout import Dropout
from lepton_jax.nn.embed import Embed
from lepton_jax.nn.linear import MLP, Dense
from lepton_jax.nn.normalization import BatchNorm, LayerNorm, RMSNorm
from lepton_jax.nn.pooling import AvgPool, MaxPool, avg_pool, max_pool
from lepton_jax.nn.recurrent import GRU, LSTM, Bidirectional

__all__ = [
    "AvgPool", "BatchNorm", "Bidirectional", "Conv", "Dense", "Dropout", "Embed", "GRU", "LSTM", "LayerNorm", "MLP",
    "MaxPool", "RMSNorm", "avg_pool", "logical_param", "max_pool",
]
