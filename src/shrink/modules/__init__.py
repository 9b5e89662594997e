"""nn.Modules that run compressed weights fast."""
from shrink.modules.input_scaled import InputScaled
from shrink.modules.quant_linear import QuantLinear, select_kernel

__all__ = ["InputScaled", "QuantLinear", "select_kernel"]
