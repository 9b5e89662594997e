"""nn.Modules that run compressed weights fast."""
from shrink.modules.decode import DecodeResult, greedy_decode
from shrink.modules.early_exit import EarlyExitModel, ExitHead
from shrink.modules.input_scaled import InputScaled
from shrink.modules.lora import LoRALinear
from shrink.modules.lowrank_linear import LowRankLinear
from shrink.modules.quant_conv2d import QuantConv2d
from shrink.modules.quant_linear import QuantLinear, select_kernel
from shrink.modules.sparse_conv2d import SparseConv2d
from shrink.modules.sparse_linear import SparseLinear, select_sparse_kernel
from shrink.modules.sparse_quant_conv2d import SparseQuantConv2d
from shrink.modules.sparse_quant_linear import SparseQuantLinear
from shrink.modules.w8a8_linear import W8A8Linear

__all__ = ["DecodeResult", "EarlyExitModel", "ExitHead", "InputScaled", "LoRALinear", "LowRankLinear", "QuantConv2d",
           "QuantLinear", "SparseConv2d", "SparseLinear", "SparseQuantConv2d", "SparseQuantLinear", "W8A8Linear",
           "greedy_decode", "select_kernel", "select_sparse_kernel"]
