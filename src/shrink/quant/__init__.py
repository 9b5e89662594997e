"""Quantization primitives: QuantSpec, QTensor, quantize, dequantize, fake_quantize."""
from shrink.quant.ops import check_finite, dequantize, fake_quantize, quantize
from shrink.quant.qtensor import QTensor
from shrink.quant.spec import QuantSpec

__all__ = ["QTensor", "QuantSpec", "check_finite", "dequantize", "fake_quantize", "quantize"]
