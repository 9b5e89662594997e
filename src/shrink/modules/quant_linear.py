"""QuantLinear: a Linear layer that keeps its weight quantized and runs it fast.

The module holds shrink's packed representation (`codes`, `scales`, `zeros`:
persistent buffers, so state_dict and safetensors round-trip) and the spec as
typed attributes. At construction it picks a forward path, recorded in
`kernel`:

  int4pack_cpu  int4 codes (symmetric or not; per group of 32/64/128/256, per
                channel or per tensor) through aten._weight_int4pack_mm_for_cpu
  int8pack_cpu  symmetric int8 per channel (or per tensor) through
                aten._weight_int8pack_mm
  int4pack_cuda the same int4 codes on an NVIDIA GPU (compute capability 8.0+)
                through aten._weight_int4pack_mm (the "tinygemm" kernel): faster
                than a bf16 Linear at batch 1, slower from ~16 rows up
                (docs/BENCHMARKS.md, GPU)
  dequant_cuda  other integer codes on a GPU: kept unpacked (int8) there and
                dequantized at each forward exactly as the reference does, then
                multiplied by cuBLAS; about 0.1-0.2x a bf16 Linear's speed on an
                H100, for the memory. (aten's _weight_int8pack_mm runs on CUDA
                too, but measured up to 300x slower than a bf16 Linear, so it is
                not used.)
  reference     anything else: dequantize on every forward (`kernel_reason` says why)

`kernel` names the path for the device the module is on: moving it with
`.to("cuda")` (or back) re-packs the codes for that device's kernel, or
falls back to "reference" there and says why.

Both kernels compute in bf16: x is cast to bf16, the scales (and the folded
zero-points) are rounded to bf16, and the output is rounded to bf16 before it
is cast back to x's dtype. That is the price of their speed (with fp32
activations they are several times slower than an fp32 Linear on this CPU).

The kernels need their own weight layout, built once from the codes; the
module therefore holds the weight twice (shrink's codes for state_dict, the
kernel's copy for forward) — `resident_nbytes` counts both, `nbytes` counts
what the QTensor stores. Forward never mutates the module, so one model may
serve several threads.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from shrink.quant import QTensor, QuantSpec, quantize
from shrink.modules._buffers import fixed_buffers, restore_dtypes
from shrink.modules._packed import format_name as _format_name
from shrink.modules._packed import placeholder_storage, stored_dtype_errors, stored_qtensor

KERNELS = ("int4pack_cpu", "int8pack_cpu", "int4pack_cuda", "dequant_cuda", "reference")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
_INT4_OFFSET = 8  # the int4 kernel computes w = (q - 8) * scale + zero, q in 0..15
# buffers whose dtype is part of the numerics: Module.half()/.to(dtype) must not cast them
_FIXED_DTYPE = ("scales", "zeros", "_kernel_scales", "_dq_scales", "_dq_zeros")
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_INT4_MM_CUDA = getattr(torch.ops.aten, "_weight_int4pack_mm", None)


def select_kernel(spec: QuantSpec, out_features: int, in_features: int,
                  device: torch.device | str = "cpu") -> tuple[str, str | None]:
    """(kernel, reason): the fastest path this spec and shape allow on `device`,
    and why not a kernel when it falls back to "reference" (reason is None otherwise)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return "reference", f"no packed kernel on {device.type}: the weight is dequantized for each forward"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "reference", "CUDA is not available"
    int4 = _int4_blocker(spec, out_features, in_features, device)
    if int4 is None:
        return f"int4pack_{device.type}", None
    if device.type == "cuda":
        dq = _dequant_blocker(spec, out_features, in_features)
        return ("dequant_cuda", None) if dq is None else ("reference", dq)
    int8 = _int8_blocker(spec, out_features, in_features)
    if int8 is None:
        return "int8pack_cpu", None
    return "reference", int8 if spec.format == "int" and spec.bits == 8 else int4


def _dequant_blocker(spec: QuantSpec, n: int, k: int) -> str | None:
    if spec.format != "int":
        return f"format {spec.format!r}: the GPU paths take integer codes only"
    if spec.granularity != "tensor" and spec.axis % 2 != 0:
        return f"axis={spec.axis}: scales run along in_features; the GPU paths need them per output row"
    if spec.granularity == "group" and k % spec.group_size:
        return f"in_features {k} is not a multiple of group_size {spec.group_size} (a ragged last group)"
    return None


def _cuda_blocker(device: torch.device, op: str) -> str | None:
    if not hasattr(torch.ops.aten, op):
        return f"this torch build has no aten.{op}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU compute capability {major}.{minor}: aten.{op} needs 8.0 or newer"
    return None


def _int4_blocker(spec: QuantSpec, n: int, k: int, device: torch.device = torch.device("cpu")) -> str | None:
    cuda = device.type == "cuda"
    if cuda:
        blocked = _cuda_blocker(device, "_weight_int4pack_mm")
        if blocked:
            return blocked
    elif not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "this torch build has no aten._weight_int4pack_mm_for_cpu"
    if spec.format != "int":
        return f"format {spec.format!r}: the CPU kernels take integer codes only"
    if spec.bits != 4:
        return f"int{spec.bits}: no CPU kernel for {spec.bits}-bit codes (int4pack takes 4-bit, int8pack 8-bit)"
    if spec.granularity != "tensor" and spec.axis % 2 != 0:
        return f"axis={spec.axis}: scales run along in_features; the int4 kernel needs them per output row"
    if spec.granularity == "group":
        if spec.group_size not in INT4_GROUP_SIZES:
            return f"group_size {spec.group_size}: the int4 kernel takes groups of {INT4_GROUP_SIZES} only"
        if k % spec.group_size:
            return f"in_features {k} is not a multiple of group_size {spec.group_size} (a ragged last group)"
    elif _int4_group(spec, k) is None:
        return f"in_features {k} is not a multiple of 32, the smallest group the int4 kernel takes"
    if cuda:
        if k % 32:
            return f"in_features {k} is not a multiple of 32, as aten._convert_weight_to_int4pack requires"
        if n % 8:
            return f"out_features {n} is not a multiple of 8, as aten._convert_weight_to_int4pack requires"
    elif n % 16:
        return f"out_features {n} is not a multiple of 16, as aten._convert_weight_to_int4pack_for_cpu requires"
    return None


def _int8_blocker(spec: QuantSpec, n: int, k: int) -> str | None:
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "this torch build has no aten._weight_int8pack_mm"
    if spec.format != "int" or spec.bits != 8:
        return f"format {_format_name(spec)}: the int8 kernel takes 8-bit integer codes only"
    if not spec.symmetric:
        return "asymmetric int8 (a zero-point): aten._weight_int8pack_mm takes symmetric codes only"
    if spec.granularity == "group":
        return "int8 per group: aten._weight_int8pack_mm takes one scale per output channel"
    if spec.granularity == "channel" and spec.axis % 2 != 0:
        return f"axis={spec.axis}: scales run along in_features; the int8 kernel needs them per output row"
    if k % 16:
        # measured on torch 2.13: other widths read out of bounds and crash the process
        return f"in_features {k} is not a multiple of 16, which aten._weight_int8pack_mm needs"
    return None


def _int4_group(spec: QuantSpec, k: int) -> int | None:
    """The kernel's group size: the spec's, or for one scale per row/tensor the
    largest supported group dividing in_features (the scale is repeated over groups)."""
    if spec.granularity == "group":
        return spec.group_size
    return next((g for g in reversed(INT4_GROUP_SIZES) if k % g == 0), None)


class QuantLinear(nn.Module):
    """y = x @ dequantize(W).T + bias, with W kept quantized.

    Build one with `from_qtensor` or `from_linear`. The constructor makes a
    shell with placeholder codes, to be filled by `load_state_dict` (the spec
    is not in the state_dict; it is the constructor's argument).

    kernel="auto" picks the fastest path for the module's device (see
    `select_kernel`), again whenever the module moves; "reference" forces
    dequantize-per-forward; naming a kernel that cannot run raises.
    cache_weight=True keeps the dequantized weight for the reference path
    (faster, but it costs what quantizing saved). Inputs on another device
    than the module's, and inputs that need a gradient (the kernels have no
    backward), take the reference path whatever `kernel` says.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True, *,
                 weight_dtype: torch.dtype = torch.float32, kernel: str = "auto", cache_weight: bool = False):
        super().__init__()
        _check_dims(in_features, out_features)
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"QuantLinear: spec must be a QuantSpec, got {type(spec).__name__}")
        codes, scales, zeros = placeholder_storage(torch.Size((out_features, in_features)), spec)
        b = torch.zeros(out_features, dtype=weight_dtype) if bias else None
        self._setup(in_features, out_features, spec, weight_dtype, codes, scales, zeros, b, kernel, cache_weight)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None, *,
                     kernel: str = "auto", cache_weight: bool = False) -> "QuantLinear":
        """A QuantLinear over a quantized [out_features, in_features] weight
        (copied: the QTensor and bias are never modified)."""
        return cls._build(qt, bias, kernel, cache_weight, copy=True)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, observer: str = "minmax", *,
                    kernel: str = "auto", cache_weight: bool = False) -> "QuantLinear":
        """Quantize an nn.Linear's weight under `spec` (round to nearest with the
        given observer) and keep its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        qt = quantize(linear.weight.detach(), spec, observer=observer)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls._build(qt, bias, kernel, cache_weight, copy=False)

    @classmethod
    def _build(cls, qt, bias, kernel, cache_weight, copy: bool) -> "QuantLinear":
        if not isinstance(qt, QTensor):
            raise TypeError(f"QuantLinear.from_qtensor expects a QTensor, got {type(qt).__name__}")
        if len(qt.shape) != 2:
            raise ValueError(
                f"QuantLinear needs a 2-D [out_features, in_features] weight; got a QTensor of shape {tuple(qt.shape)}"
            )
        out_features, in_features = (int(s) for s in qt.shape)
        _check_dims(in_features, out_features)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_features,):
                got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"QuantLinear: bias must be a float tensor of shape ({out_features},), got {got}")
            bias = bias.detach()
        dup = (lambda t: None if t is None else t.detach().clone()) if copy else (lambda t: t)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._setup(in_features, out_features, qt.spec, qt.dtype, dup(qt.data), dup(qt.scale),
                 dup(qt.zero_point), dup(bias), kernel, cache_weight)
        return m

    def _setup(self, in_features, out_features, spec, weight_dtype, codes, scales, zeros, bias, kernel, cache_weight):
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.weight_dtype = weight_dtype
        self.cache_weight = bool(cache_weight)
        self._grid = spec.grid()
        self._requested = kernel
        self.kernel, self.kernel_reason = _resolve_kernel(kernel, spec, out_features, in_features, codes.device)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        # frozen like the weight; a Parameter so that code expecting nn.Linear's `bias` finds one
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.register_buffer("_kernel_weight", None, persistent=False)
        self.register_buffer("_kernel_scales", None, persistent=False)
        self.register_buffer("_cached_weight", None, persistent=False)
        self.register_buffer("_dq_codes", None, persistent=False)
        self.register_buffer("_dq_scales", None, persistent=False)
        self.register_buffer("_dq_zeros", None, persistent=False)
        self._prepare()

    def _prepare(self) -> None:
        """Derive the forward path's tensors from the stored codes (at construction, after
        loading, and after a move to another kind of device)."""
        device = self.codes.device
        self._kernel_group = _int4_group(self.spec, self.in_features) if self.kernel.startswith("int4") else None
        w = s = cached = None
        dq = (None, None, None)
        if self.kernel != "reference":
            codes = self._cpu_qtensor().int_codes()  # [N, K] int32 in the spec's range
            n, k = self.out_features, self.in_features
            if self.kernel == "dequant_cuda":
                dq = self._dequant_tensors(codes, device)
            elif self.kernel.startswith("int4"):
                g = self._kernel_group
                if self.spec.symmetric:
                    codes = codes + _INT4_OFFSET  # -8..7 -> 0..15
                if self.kernel == "int4pack_cpu":
                    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
                else:  # two codes a byte, the even column in the high nibble, then tinygemm's tiling
                    pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
                    w = torch.ops.aten._convert_weight_to_int4pack(pairs.to(device), _inner_k_tiles(k))
                scale = _per_group(self.scales.cpu(), n, k // g)
                if self.spec.has_zero_point:
                    # (q - zp) * s == (q - 8) * s + (8 - zp) * s
                    zero = (_INT4_OFFSET - _per_group(self.zeros.cpu(), n, k // g)) * scale
                else:
                    zero = torch.zeros_like(scale)
                s = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
            else:
                w = codes.to(torch.int8).contiguous()
                s = _per_group(self.scales.cpu(), n, 1).reshape(n).to(torch.bfloat16).contiguous()
            if w is not None:
                w, s = w.to(device), s.to(device)
        elif self.cache_weight:
            cached = self._dequantize(device)
        self._kernel_weight, self._kernel_scales, self._cached_weight = w, s, cached
        self._dq_codes, self._dq_scales, self._dq_zeros = dq
        self._update_fast()

    def _dequant_tensors(self, codes: torch.Tensor, device: torch.device):
        """(int8 codes [N, G, g], float32 scales [N, G, 1], zero-points or None) on `device`."""
        n, k = self.out_features, self.in_features
        groups = k // self.spec.group_size if self.spec.granularity == "group" else 1
        shape = (n, groups, k // groups)
        scale = _per_group(self.scales.cpu(), n, groups).reshape(n, groups, 1)
        zero = None if not self.spec.has_zero_point else _per_group(self.zeros.cpu(), n, groups).reshape(n, groups, 1)
        return (codes.to(torch.int8).reshape(shape).to(device), scale.contiguous().to(device),
                None if zero is None else zero.contiguous().to(device))

    def _update_fast(self) -> None:
        # The kernel's tensors are also kept as plain attributes: nn.Module.__getattr__ on a
        # buffer costs ~0.3 us a lookup, a share of a batch-1 call. Refreshed wherever the
        # buffers change (_prepare, _apply).
        w, s = self._kernel_weight, self._kernel_scales
        if w is None:
            self._fast = None
        else:
            cuda = self.kernel.endswith("cuda")
            mm = (_INT4_MM_CUDA if cuda else _INT4_MM) if self._kernel_group is not None else _INT8_MM
            self._fast = (w, s, w.device.type, mm)

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept lean: at batch 1 a 1024x1024 int4 matmul takes ~10 us, so every
        # Python-level op here (each ~1-3 us) is a visible share of the call.
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"QuantLinear: input must be a floating-point tensor, got {what}")
        k = self.in_features
        dims = x.dim()
        if dims == 0 or x.shape[-1] != k:
            raise ValueError(
                f"QuantLinear: input of shape {tuple(x.shape)} does not match in_features={k} "
                "(the last dimension must equal it)"
            )
        fast = self._fast
        if fast is None or x.device.type != fast[2] or (x.requires_grad and torch.is_grad_enabled()):
            return self._fallback_forward(x)
        w, scales, _, mm = fast
        dtype = x.dtype
        x2 = x if dims == 2 else x.reshape(-1, k)
        if dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)  # keeps a permuted input's strides: hence the check below
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        group = self._kernel_group
        y = mm(x2, w, group, scales) if group is not None else mm(x2, w, scales)
        bias = self._parameters["bias"]
        if bias is None:
            if dtype != torch.bfloat16:
                y = y.to(dtype)
        elif dtype == torch.bfloat16:
            y = y.add_(bias if bias.dtype == dtype else bias.to(dtype))  # y is the kernel's fresh output
        elif dtype == torch.float32 and bias.dtype == dtype:
            y = torch.add(bias, y)  # promotes the bf16 y: one op for the cast and the add, same values
        else:
            y = y.to(dtype).add_(bias.to(dtype))
        return y if dims == 2 else y.view(*x.shape[:-1], self.out_features)

    def _fallback_forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self._dq_codes
        if codes is not None and x.device == codes.device:
            return self._dequant_forward(x)
        return self._reference_forward(x)

    def _dequant_forward(self, x: torch.Tensor) -> torch.Tensor:
        # the reference's arithmetic (float32 (q - zp) * scale, then x's dtype), on the GPU
        w = self._dq_codes.to(torch.float32)
        if self._dq_zeros is not None:
            w = w.sub_(self._dq_zeros)
        w = w.mul_(self._dq_scales).view(self.out_features, self.in_features).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._cached_weight if self._cached_weight is not None else self._dequantize(x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(device=x.device, dtype=x.dtype), bias)

    # ------------------------------------------------------------ views of the weight

    def to_qtensor(self) -> QTensor:
        """The stored weight as a QTensor (sharing the module's buffers)."""
        return stored_qtensor(self, torch.Size((self.out_features, self.in_features)))

    def dequantized_weight(self) -> torch.Tensor:
        """W_hat = (q - zero_point) * scale as [out_features, in_features] in weight_dtype."""
        return self._dequantize(self.codes.device)

    @property
    def kernel_dtype(self) -> torch.dtype | None:
        """The dtype the packed kernel multiplies in (bf16), for inputs on the module's device;
        None where forward runs F.linear in the input's own dtype (reference, dequant_cuda)."""
        return torch.bfloat16 if self._fast is not None else None

    @property
    def nbytes(self) -> int:
        """Stored bytes of the weight as the QTensor counts them (codes + scales + zero-points; no bias)."""
        return self.to_qtensor().nbytes

    @property
    def resident_nbytes(self) -> int:
        """Bytes this module holds in memory: every buffer and parameter, the kernel's copy included."""
        tensors = list(self.buffers(recurse=False)) + list(self.parameters(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={_format_name(self.spec)}, kernel={self.kernel}")
        return text + (f", kernel_reason={self.kernel_reason!r}" if self.kernel_reason else "")

    def _cpu_qtensor(self) -> QTensor:
        return stored_qtensor(self, torch.Size((self.out_features, self.in_features)), cpu=True)

    def _dequantize(self, device: torch.device) -> torch.Tensor:
        return self._cpu_qtensor().dequantize().to(device)

    # ------------------------------------------------------------ nn.Module plumbing

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) would re-round the scales and change the numerics; devices may change
        kept = fixed_buffers(self, _FIXED_DTYPE)
        before = self.codes.device
        super()._apply(fn, recurse)
        restore_dtypes(self, kept)
        after = self.codes.device
        if after.type != before.type:  # each device has its own kernels and packing
            self.kernel, self.kernel_reason = _resolve_kernel(self._requested, self.spec, self.out_features,
                                                              self.in_features, after, moved=True)
            self._prepare()
        else:
            self._update_fast()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        n_errors = len(error_msgs)
        error_msgs.extend(stored_dtype_errors(self, state_dict, prefix))
        if len(error_msgs) > n_errors:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if len(error_msgs) == n_errors:
            self._prepare()


def _resolve_kernel(kernel: str, spec: QuantSpec, n: int, k: int, device: torch.device,
                    moved: bool = False) -> tuple[str, str | None]:
    """The path for a module on `device`. A named kernel is honoured on its own
    device; after a move to another kind of device (moved=True) the module takes
    that device's best path instead, since the named one cannot run there."""
    if kernel == "reference":
        return "reference", "kernel='reference' was requested"
    if kernel not in KERNELS and kernel != "auto":
        raise ValueError(f"QuantLinear: kernel must be 'auto' or one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel == "auto" or (moved and not kernel.endswith(device.type)):
        return select_kernel(spec, n, k, device)
    if not kernel.endswith(device.type):
        raise ValueError(f"QuantLinear: kernel {kernel!r} runs on {kernel.rsplit('_', 1)[1]}, but the weight "
                         f"is on {device}; move the module after building it, or pass kernel='auto'")
    if kernel.startswith("int4"):
        blocker = _int4_blocker(spec, n, k, device)
    else:
        blocker = _dequant_blocker(spec, n, k) if kernel == "dequant_cuda" else _int8_blocker(spec, n, k)
    if blocker is not None:
        raise ValueError(f"QuantLinear: kernel {kernel!r} cannot run this weight [{n}, {k}]: {blocker}")
    return kernel, None


def _inner_k_tiles(k: int) -> int:
    """tinygemm's tiling of in_features: 8 tiles of 16 where k allows, else 4 or 2 (k % 32 == 0 is checked)."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def _per_group(p: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Scale-shaped () / (N,) / (N, G) parameters as float32 [N, groups]."""
    p = p.to(torch.float32)
    if p.dim() == 2:
        return p
    return p.reshape(-1, 1).expand(n, groups)


def _check_dims(in_features, out_features) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"QuantLinear: {name} must be a positive integer, got {v!r}")
