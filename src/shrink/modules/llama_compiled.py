"""LlamaStepper's decode step compiled by torch.compile: the small ops of a layer fused.

After the stepper (llama_stepper.py) a batch-1 decode token of the 374M Llama still spends
~6 ms in ~1,300 small ops (two RMSNorms, rotary, cache writes, attention, residual adds,
dtype casts: ~55 per layer) beside ~9 ms in the int4 kernel. Inductor fuses each run of
them into one generated C++ loop, keeps the int4/int8 kernels as external calls, and with
its C++ wrapper there is no Python between them.

The compiled function is a plain function of tensors: the layers' weights, norms and KV
cache are arguments, with fixed shapes (the cache is allocated for max_len positions; the
step attends to all of them under a mask `position <= pos`, and writes its k/v with
index_copy_ at `pos`; its length is max_len rounded up to a multiple of 256). So one
compiled graph serves every LlamaStepper of the same shapes and kinds of projections: a
new stepper, or another model of the same architecture, reuses it (dynamo guards on
shapes and dtypes, not on tensor identity) and the first step only pays the compile
(~40 s for the 24-layer 374M Llama on 2 cores; inductor's on-disk cache makes later
processes faster). Each signature has its own graph (compiled_decode).

Projections it takes: bias-free QuantLinear layers on the CPU int4/int8 kernels
(llama_stepper.kernel_parts; q/k/v and gate/up fused) and plain nn.Linear. Anything else
(LoRA, sparse, the dequantize path) makes `plan()` return a reason instead, which
LlamaStepper(compile=True) raises as a ValueError (the eager stepper still takes them). The arithmetic is the eager stepper's, but inductor's generated
loops (and attention over the masked, longer cache) may sum in another order, so values
agree to float rounding rather than bit for bit: ~1e-7 relative for fp32 layers, and up
to ~1e-3 of the logits' range with the int4/int8 kernels, whose bf16 activations turn a
last-bit difference of their fp32 input into a bf16 rounding flip now and then (the tests
compare logits with those tolerances, and greedy tokens exactly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_INT4 = "int4"
_INT8 = "int8"
_LINEAR = "linear"
_compiled: dict = {}


def _proj_parts(mods: list[nn.Module], parts):
    """(kind, a, b, group) for the projections of one input (parts: the stepper's
    kernel_parts of them, or None), or a reason string."""
    from shrink.modules.quant_linear import _INT4_MM, _INT8_MM

    if parts is not None:
        mm, w, s, group = parts
        if mm is _INT4_MM and group is not None:
            return _INT4, w, s, group
        if mm is _INT8_MM and group is None:
            return _INT8, w, s, 0
        return f"{type(mods[0]).__name__} on kernel {mm}"
    if all(type(m) is nn.Linear for m in mods):
        if len(mods) == 1:
            m = mods[0]
            return _LINEAR, m.weight, m.bias, 0
        ws = [m.weight for m in mods]
        bs = [m.bias for m in mods]
        b = None if all(x is None for x in bs) else torch.cat(
            [x if x is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) for x, w in zip(bs, ws)])
        return _LINEAR, torch.cat(ws, 0), b, 0
    kinds = sorted({type(m).__name__ for m in mods})
    return f"projections of type {', '.join(kinds)} (the compiled step takes QuantLinear on the CPU int4/int8 " \
           "kernels without bias, or nn.Linear)"


def plan(stepper) -> tuple[dict | None, str | None]:
    """(what the compiled step needs, None) or (None, why the stepper cannot be compiled)."""
    inner = stepper.inner
    layers = []
    for layer, parts, (n1, _qkv, _o, n2, _gu, _down, nh, nkv, hd, scale, kc, vc) in zip(
            inner.layers, stepper.parts, stepper.layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups = ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
                  [mlp.down_proj])
        projs = [_proj_parts(g, pt) for g, pt in zip(groups, parts)]
        bad = next((p for p in projs if isinstance(p, str)), None)
        if bad is not None:
            return None, bad
        layers.append((n1.weight, float(n1.variance_epsilon), *projs, n2.weight, float(n2.variance_epsilon),
                       kc, vc, (nh, nkv, hd, scale, attn.q_proj.out_features, mlp.gate_proj.out_features)))
    from shrink.modules.llama_stepper import kernel_parts

    head = _proj_parts([stepper.model.lm_head], kernel_parts([stepper.model.lm_head]))
    if isinstance(head, str):
        return None, f"lm_head: {head}"
    if stepper.model.lm_head.in_features != inner.norm.weight.shape[0]:
        return None, "lm_head's input is not the final norm's width"
    return {"layers": layers, "head": head, "norm": (inner.norm.weight, float(inner.norm.variance_epsilon)),
            "rope": stepper.rope, "ar": torch.arange(layers[0][-3].shape[2], device=inner.norm.weight.device)}, None


def _proj(p, x: torch.Tensor) -> torch.Tensor:
    kind, a, b, group = p
    if kind == _LINEAR:
        return F.linear(x, a, b)
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    if kind == _INT4:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, a, group, b)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, a, b)
    return y.to(dtype).view(*x.shape[:-1], y.shape[-1])


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _decode(x: torch.Tensor, pos: torch.Tensor, p: dict) -> torch.Tensor:
    """Logits [b, 1, vocab] for embeddings x [b, 1, hidden] at position pos ([1] int64)."""
    b = x.shape[0]
    mask = (p["ar"] <= pos)[None]
    tables = {hd: (c.index_select(0, pos), s.index_select(0, pos)) for hd, (c, s) in p["rope"].items()}
    for n1, e1, qkv, o, gu, down, n2, e2, kc, vc, (nh, nkv, hd, scale, nq, ni) in p["layers"]:
        cos, sin = tables[hd]
        y = _proj(qkv, _norm(x, n1, e1))
        qk, v = y[..., : nq + nkv * hd], y[..., nq + nkv * hd:]
        qk = qk.reshape(b, 1, nh + nkv, hd)
        half = hd // 2
        qk = (qk * cos + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin).transpose(1, 2)
        kc.index_copy_(2, pos, qk[:, nh:])
        vc.index_copy_(2, pos, v.reshape(b, 1, nkv, hd).transpose(1, 2))
        a = F.scaled_dot_product_attention(qk[:, :nh], kc, vc, attn_mask=mask, scale=scale,
                                           enable_gqa=nh != nkv)
        x = x + _proj(o, a.transpose(1, 2).reshape(b, 1, nh * hd))
        y = _proj(gu, _norm(x, n2, e2))
        x = x + _proj(down, F.silu(y[..., :ni]) * y[..., ni:])
    w, eps = p["norm"]
    return _proj(p["head"], _norm(x, w, eps))


def _signature(p: dict) -> tuple:
    """What the compiled graph depends on: the plan's structure, its tensors' shapes, strides
    and dtypes, and its constants (kinds, head counts, eps, scale), not tensor identities."""
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(p)
    return str(spec), tuple((tuple(x.shape), x.stride(), x.dtype, x.device.type) if isinstance(x, torch.Tensor)
                            else x for x in leaves)


def compiled_decode(p: dict):
    """The compiled _decode for plan p's signature. Each signature gets its own copy of
    _decode's code object: dynamo caches graphs per code object (at most 8 before it gives
    up), so different models or lengths in one process never evict or exhaust each other."""
    import types

    key = _signature(p)
    fn = _compiled.get(key)
    if fn is None:
        copy = types.FunctionType(_decode.__code__.replace(), _decode.__globals__, "_decode")
        fn = _compiled[key] = torch.compile(copy, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    return fn
