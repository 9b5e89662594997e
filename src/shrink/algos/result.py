"""QuantResult: what a weight-quantization algorithm (rtn, gptq) returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shrink.quant import QTensor, dequantize


@dataclass(frozen=True, eq=False)
class QuantResult:
    """qtensor        the codes and their scales; dequantize(qtensor) is the quantized weight
    loss           the layer-output proxy error. With a Hessian H (= 2/n X X^T of the
                   layer's inputs) it is tr((W - Q) H (W - Q)^T) = 2/n ||W X - Q X||_F^2,
                   the same quantity for rtn and gptq so the two compare directly;
                   rtn without a Hessian gives the weight MSE mean((W - Q)^2)
    damp_used      gptq: the relative damping that let the Cholesky factorization
                   succeed (a fraction of mean(diag(H))); 0 for rtn
    retries        gptq: factorizations that failed before that one (each retry x10 damping)
    dead_columns   gptq: input columns with H[i, i] == 0 (never active); their weights are 0
    perm           gptq with act_order: the processing order of the input columns
                   (descending diag(H)); None otherwise
    static_groups  gptq: group scales were fixed up front from the original weight
                   (asked for, or forced by act_order with groups)
    seconds        wall time of the call
    """

    qtensor: QTensor
    loss: float
    damp_used: float = 0.0
    retries: int = 0
    dead_columns: int = 0
    perm: torch.Tensor | None = None
    static_groups: bool = False
    seconds: float = 0.0

    def dequantize(self) -> torch.Tensor:
        """The quantized weight as floats (in the original weight's dtype)."""
        return dequantize(self.qtensor)
