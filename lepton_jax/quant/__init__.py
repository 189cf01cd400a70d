"""Int8 quantization. Post-training on qwix: weight-only, or weights and
activations with static scales from calibration batches, and
quantization-aware training (``qat``). Storage: ``Int8Weight`` holds a frozen
float weight as int8 with per-channel scales (``quantize_int8``/``dequantize``)."""

from lepton_jax.quant.ptq import MODES, QuantizedModel, qat, quantize
from lepton_jax.quant.weights import Int8Weight, dequantize, quantize_int8

__all__ = ["Int8Weight", "MODES", "QuantizedModel", "dequantize", "qat", "quantize", "quantize_int8"]
