"""Post-training int8 quantization on qwix: weight-only, or weights and
activations with static scales from calibration batches."""

from lepton_jax.quant.ptq import MODES, QuantizedModel, quantize

__all__ = ["MODES", "QuantizedModel", "quantize"]
