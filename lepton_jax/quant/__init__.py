"""Post-training int8 quantization on qwix: weight-only, or weights and
activations with static scales from calibration batches, and
quantization-aware training (``qat``)."""

from lepton_jax.quant.ptq import MODES, QuantizedModel, qat, quantize

__all__ = ["MODES", "QuantizedModel", "qat", "quantize"]
