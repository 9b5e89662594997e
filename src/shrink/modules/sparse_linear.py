"""SparseLinear: a Linear layer that stores only its kept weights (shrink.formats.sparse).

The stored non-zero values are an nn.Parameter, `values`; the pattern lives in
integer buffers (`mask_bits`, or `col_indices` + `crow_indices`, or `positions`),
all persistent, so state_dict and safetensors round-trip. A fine-tune trains the
values while the pattern stays fixed: pruned positions have no storage, hence no
gradient. (For "nm", a group with fewer than n kept weights has zero-valued padding
slots; they are part of the N:M pattern and train like the others: `mask()` shows them.)

Forward paths, named by `kernel` (for inputs of the values' dtype on their device):

  csr_cpu               layout "csr", fp32/fp64 on the CPU: torch.sparse.mm over a CSR
                        tensor built each call around the stored values (no copy of them;
                        the int16 column indices are widened to int32, nnz x 4 bytes,
                        for the call). torch.sparse.mm measured 1-6x faster than
                        F.linear with a sparse_csr weight at 64 rows, equal at 1 row.
  semi_structured_cuda  layout "nm" 2:4, fp16/bf16 on an NVIDIA GPU of compute
                        capability 8.0+, out % 32 == 0, in % 64 == 0: the dense weight is
                        rebuilt and compressed by torch.sparse.to_sparse_semi_structured
                        each call, then multiplied by the 2:4 sparse tensor cores.
  dense_rebuild         everything else, and any call that needs gradients: the dense
                        weight is rebuilt (differentiably w.r.t. values) and F.linear runs.

The trade-off: nothing is cached. A cached dense (or CSR int32 / semi-structured)
copy would make every call faster but hold more bytes than the sparse storage
saves, so each call pays the rebuild instead: storage shrinks, and only "csr" at
high sparsity (about 90% and up on this CPU) runs faster than the dense Linear;
bitmask and nm on the CPU are slower than dense (docs/BENCHMARKS.md, "Sparse
storage and the no-speedup trap"). The fast paths run when autograd is off
(torch.no_grad / inference_mode) or nothing needs a gradient.

SparseConv2d (shrink.modules.sparse_conv2d) shares the storage and is re-exported here.
Forward never mutates the module (the CSR view is built per call around the stored
tensors), so one model may serve several threads.
"""
from __future__ import annotations

import threading
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from shrink.formats.sparse import encode_sparse
from shrink.modules._sparse import SparseBase, placeholder_stored
from shrink.modules.sparse_conv2d import SparseConv2d

__all__ = ["KERNELS", "SparseConv2d", "SparseLinear", "select_sparse_kernel"]
KERNELS = ("csr_cpu", "semi_structured_cuda", "dense_rebuild")
_csr_warned = False
_csr_warn_lock = threading.Lock()  # warnings.catch_warnings swaps a process-wide filter list: one thread at a time


class SparseLinear(SparseBase):
    """y = x @ W.T + bias with W stored sparse: only the kept values and the pattern.

    Build one with `from_dense` or `from_linear`. The constructor makes a shell of the
    right sizes (zero values, a placeholder pattern) for load_state_dict to fill.
    """

    def __init__(self, in_features: int, out_features: int, layout: str, nnz: int, bias: bool = True,
                 n: int | None = None, m: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_dims(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        try:
            stored = placeholder_stored(layout, (out_features, in_features), nnz, dtype, n, m)
        except ValueError as e:
            raise ValueError(f"SparseLinear: {e}") from None
        self._setup_storage(stored, torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   layout: str = "bitmask", n: int | None = None, m: int | None = None) -> "SparseLinear":
        """Store weight [out, in] where mask (default weight != 0) in `layout` (copied; the
        inputs are never modified). "nm" needs n and m, and a mask with at most n kept per group of m."""
        try:
            stored = encode_sparse(weight, mask, layout, n=n, m=m)
        except ValueError as e:
            raise ValueError(f"SparseLinear.from_dense: {e}") from None
        out_f, in_f = stored.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_f,):
                got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"SparseLinear.from_dense: bias must be a float tensor of shape ({out_f},), got {got}")
            bias = bias.detach().clone()
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features = in_f, out_f
        mod._setup_storage(stored, bias)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None, layout: str = "bitmask",
                    n: int | None = None, m: int | None = None) -> "SparseLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                              mask, layout, n, m)

    # ------------------------------------------------------------ forward

    @property
    def kernel(self) -> str:
        """The path an inference call (no gradient, input of the values' dtype and device) takes."""
        return select_sparse_kernel(self.layout, self.values.dtype, self.values.device, self._matrix(),
                                    self.n, self.m)[0]

    @property
    def kernel_reason(self) -> str | None:
        """Why `kernel` is dense_rebuild (None when a sparse kernel runs)."""
        return select_sparse_kernel(self.layout, self.values.dtype, self.values.device, self._matrix(),
                                    self.n, self.m)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"SparseLinear: input must be a floating-point tensor, got {what}")
        k = self.in_features
        if x.dim() == 0 or x.shape[-1] != k:
            raise ValueError(f"SparseLinear: input of shape {tuple(x.shape)} does not match in_features={k} "
                             "(the last dimension must equal it)")
        values, bias = self.values, self.bias
        grad = torch.is_grad_enabled() and (values.requires_grad or x.requires_grad
                                            or (bias is not None and bias.requires_grad))
        if not grad and x.dtype == values.dtype and x.device == values.device:
            kernel = self.kernel
            if kernel == "csr_cpu":
                return self._csr_forward(x)
            if kernel == "semi_structured_cuda":
                w = torch.sparse.to_sparse_semi_structured(self._dense(values))
                y = F.linear(x.reshape(-1, k), w, bias)
                return y.reshape(*x.shape[:-1], self.out_features)
        weight = self._dense(values).to(device=x.device, dtype=x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    def _csr_forward(self, x: torch.Tensor) -> torch.Tensor:
        global _csr_warned
        crow = self.crow_indices
        if not _csr_warned:  # torch warns once per process that sparse CSR is "beta": not the user's concern
            # Under a lock: two threads inside catch_warnings at once could restore each other's
            # saved filters and leave "ignore everything" installed for the whole process.
            with _csr_warn_lock:
                if not _csr_warned:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.sparse_csr_tensor(crow[:1], crow[:0], self.values[:0], (0, self.in_features),
                                                check_invariants=False)
                    _csr_warned = True
        # the indices were checked when the module was built or loaded (SparseBase.stored)
        csr = torch.sparse_csr_tensor(crow, self.col_indices.to(crow.dtype), self.values,
                                      (self.out_features, self.in_features), check_invariants=False)
        y = torch.sparse.mm(csr, x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nm = f", n={self.n}, m={self.m}" if self.layout == "nm" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}{nm}, nnz={self.nnz}, sparsity={self.sparsity:.3f}, kernel={self.kernel}")


def select_sparse_kernel(layout: str, dtype: torch.dtype, device: torch.device, shape: tuple[int, int],
                         n: int | None = None, m: int | None = None) -> tuple[str, str | None]:
    """(kernel, reason): the sparse kernel that runs this storage for inference, or
    dense_rebuild and why not."""
    device = torch.device(device)
    if layout == "csr":
        if device.type != "cpu":
            return "dense_rebuild", f"csr: torch's CSR matmul is used on the CPU only (weight on {device})"
        if dtype not in (torch.float32, torch.float64):
            return "dense_rebuild", f"csr: torch's CPU CSR matmul has no {dtype} kernel (fp32/fp64 only)"
        return "csr_cpu", None
    if layout == "nm":
        reason = _semi_structured_blocker(dtype, device, shape, n, m)
        return ("semi_structured_cuda", None) if reason is None else ("dense_rebuild", reason)
    return "dense_rebuild", "bitmask: no sparse kernel reads a bitmask; the dense weight is rebuilt each call"


def _semi_structured_blocker(dtype, device, shape, n, m) -> str | None:
    if (n, m) != (2, 4):
        return f"nm {n}:{m}: the sparse tensor cores take 2:4 only"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"nm 2:4: the semi-structured kernel runs on NVIDIA GPUs only (weight on {device})"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch build has no torch.sparse.to_sparse_semi_structured"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"nm 2:4: the semi-structured kernel takes fp16/bf16 values, not {dtype}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU compute capability {major}.{minor}: 2:4 sparse tensor cores need 8.0 or newer"
    if shape[0] % 32 or shape[1] % 64:
        return f"shape {list(shape)}: the semi-structured kernel needs out % 32 == 0 and in % 64 == 0"
    return None


def _check_dims(in_features, out_features) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"SparseLinear: {name} must be a positive integer, got {v!r}")
