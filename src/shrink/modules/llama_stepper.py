"""A lean decode step for transformers Llama models: the same arithmetic, less overhead per token.

At batch 1 a decode step of a 24-layer Llama is ~170 small matmuls and ~600 small
element-wise ops; transformers' forward adds its own work to each token (mask and cache
bookkeeping, a growing `DynamicCache` concatenated every step, keyword plumbing, module
calls for the norms, a rotary table computed for every position). `LlamaStepper` runs
the same layers with:

- a KV cache allocated once for the whole decode (written in place, no concatenation);
- the rotary cos/sin computed once for every position by the model's own rotary module,
  with rotate_half's sign folded into the sine table (exact: negation is exact);
- RMSNorm as transformers computes it (float32, then the input dtype, then the weight);
- q/k/v and gate/up each as one kernel call when they are QuantLinear layers on the CPU
  int4/int8 kernels with the same group size and no bias (and, for int4, out_features a
  multiple of 64: the packed layout stores rows in blocks of 64). The kernel computes every
  output column on its own, so the fused call gives the same values as separate calls;
- every other projection called as the module it is (nn.Linear, QuantLinear, LoRA,
  sparse...), so any compressed layer works.

The values equal transformers' forward (the tests compare logits and tokens): it is a
faster path through the same computation, not an approximation.

`why_not(model)` says why a model is not taken (then greedy_decode uses transformers'
forward): not a LlamaForCausalLM-shaped model, a rotary type whose tables depend on the
sequence length, a sliding window, hooks on modules the stepper does not call (they would
be skipped), training mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# rotary types whose cos/sin depend only on the position (dynamic NTK and longrope rescale
# with the sequence length, so one table cannot serve every step)
_STATIC_ROPE = ("default", "linear", "llama3")
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# the compiled step's KV cache holds a multiple of this many positions
_COMPILED_LEN = 256

# rows of the CPU int4pack layout that are stored together (checked by the tests: a module of
# out_features not a multiple of this gives wrong values when concatenated)
_INT4_BLOCK_N = 64


def why_not(model: nn.Module) -> str | None:
    """None when LlamaStepper can run `model`, else the reason it cannot."""
    inner = getattr(model, "model", None)
    cfg = getattr(model, "config", None)
    if inner is None or cfg is None or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a transformers causal LM with .model and .lm_head"
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return "the model has no decoder layer list at model.layers"
    if any(type(layer).__name__ != "LlamaDecoderLayer" for layer in layers):
        return "only transformers' LlamaDecoderLayer is supported"
    for attr in ("embed_tokens", "norm", "rotary_emb"):
        if getattr(inner, attr, None) is None:
            return f"model.{attr} is missing"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"rotary type {rope!r}: its tables depend on the sequence length"
    if getattr(cfg, "sliding_window", None) is not None:
        return "a sliding attention window"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"MLP activation {cfg.hidden_act!r} (the stepper computes silu)"
    if model.training:
        return "the model is in training mode"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are registered"
    called = {id(layer.get_submodule(p)) for layer in layers for p in _LAYER_PARTS} | {id(model.lm_head),
                                                                                       id(inner.embed_tokens)}
    for name, m in model.named_modules():
        if id(m) not in called and (m._forward_hooks or m._forward_pre_hooks):
            return f"{name or type(model).__name__} has forward hooks, which the stepper would skip"
    return None


def kernel_parts(mods: list[nn.Module]):
    """(kernel op, packed weight, scales, group or None for int8) computing every module of
    `mods` (same input) in one call, or None when they are not all bias-free QuantLinear
    layers on the same CPU kernel with the same group. One module: its own packed weight
    (no copy); several: their packed weights and scales concatenated."""
    from shrink.modules.quant_linear import QuantLinear

    if not all(type(m) is QuantLinear for m in mods):
        return None
    fast = [m._fast for m in mods]
    first = mods[0]
    if any(f is None or f[2] != "cpu" or f[3] is not fast[0][3] for f in fast) \
            or any(m._kernel_group != first._kernel_group or m.bias is not None for m in mods):
        return None
    group, mm = first._kernel_group, fast[0][3]
    if group is not None and len(mods) > 1 and any(m.out_features % _INT4_BLOCK_N for m in mods):
        return None   # the CPU int4 layout interleaves rows in blocks of 64: only whole blocks concatenate
    if len(fast) == 1:
        return mm, fast[0][0], fast[0][1], group
    # int4 scales_and_zeros are [K / group, N, 2]; int8 scales are [N]
    return (mm, torch.cat([f[0] for f in fast], 0),
            torch.cat([f[1] for f in fast], 1 if group is not None else 0), group)


_UNSET = object()


def _fused(mods: list[nn.Module], join: int = 1, parts=_UNSET):
    """One kernel call computing every module of `mods` (kernel_parts, or `parts` when the
    caller already has them), or None. For a single module: the kernel call without the
    module's own call and checks.
    join: the first `join` modules' outputs come back as one tensor (a view of the kernel's)."""
    parts = kernel_parts(mods) if parts is _UNSET else parts
    if parts is None:
        return None
    mm, w, s, group = parts
    first = mods[0]
    sizes = [sum(m.out_features for m in mods[:join])] + [m.out_features for m in mods[join:]]
    k = first.in_features

    def call(x: torch.Tensor):
        dtype = x.dtype
        x2 = x.reshape(-1, k)
        if dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = mm(x2, w, group, s) if group is not None else mm(x2, w, s)
        if dtype != torch.bfloat16:
            y = y.to(dtype)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y.split(sizes, -1) if len(sizes) > 1 else y

    return call


def _separate(mods: list[nn.Module]):
    return lambda x: tuple(m(x) for m in mods)


def _calls(mods: list[nn.Module], parts):
    """A callable of the modules' common input: one fused kernel call where possible (parts:
    their kernel_parts), else each module called; a tuple for several modules, a tensor for one."""
    fused = _fused(mods, parts=parts)
    if fused is not None:
        return fused
    return _separate(mods) if len(mods) > 1 else mods[0]


def _qkv_calls(attn: nn.Module, parts):
    """x -> (q and k side by side on the last dim, v): the rotary step takes q and k together."""
    fused = _fused([attn.q_proj, attn.k_proj, attn.v_proj], join=2, parts=parts)
    if fused is not None:
        return fused
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    return lambda x: (torch.cat((q(x), k(x)), -1), v(x))


class LlamaStepper:
    """Decode state for one batch of sequences (no padding), positions 0 .. max_len - 1."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, compile: bool = False):
        """compile: decode steps (one token each) run llama_compiled's torch.compile'd step
        (a ValueError says why a model cannot take it); the prompt still runs eagerly."""
        why = why_not(model)
        if why is not None:
            raise ValueError(f"LlamaStepper: {why}")
        inner = model.model
        self.model, self.inner = model, inner
        emb = inner.embed_tokens.weight
        dtype, device = emb.dtype, emb.device
        self.max_len = int(max_len)
        # the compiled step has fixed shapes: its cache is rounded up so that decodes of
        # similar lengths share one compiled graph (the positions past max_len stay masked)
        length = -(-self.max_len // _COMPILED_LEN) * _COMPILED_LEN if compile else self.max_len
        positions = torch.arange(length, device=device)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=dtype, device=device), positions)
        self.layers = []
        # per layer: the kernel_parts of q/k/v, o, gate/up, down (None where not on a CPU
        # kernel), made once and shared by the eager calls and the compiled plan
        self.parts = []
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # head dim -> cos, sin [max_len, 1, hd]
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            hd = int(attn.head_dim)
            if hd not in self.rope:
                c, s = cos[0].to(dtype), sin[0].to(dtype).clone()
                if c.shape[-1] != hd:
                    raise ValueError(f"LlamaStepper: rotary tables of width {c.shape[-1]} for heads of {hd}")
                s[:, : hd // 2] = -s[:, : hd // 2]   # rotate_half(x) * sin == swap_halves(x) * sin'
                self.rope[hd] = (c[:, None], s[:, None])
            nh, nkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
            kc, vc = (torch.zeros(batch, nkv, length, hd, dtype=dtype, device=device) for _ in range(2))
            groups = ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
                      [mlp.down_proj])
            parts = tuple(kernel_parts(g) for g in groups)
            self.parts.append(parts)
            self.layers.append((layer.input_layernorm, _qkv_calls(attn, parts[0]),
                                _calls(groups[1], parts[1]), layer.post_attention_layernorm,
                                _calls(groups[2], parts[2]), _calls(groups[3], parts[3]),
                                nh, nkv, hd, float(attn.scaling), kc, vc))
        self.pos = 0
        self._plan = None
        if compile:
            from shrink.modules.llama_compiled import compiled_decode, plan

            self._plan, why = plan(self)
            if why is not None:
                raise ValueError(f"LlamaStepper(compile=True): {why}")
            self._compiled = compiled_decode(self._plan)
            self._pos_t = torch.zeros(1, dtype=torch.int64, device=device)

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 1, vocab] of the last position after feeding ids [batch, t]
        (t > 1 only as the first call: the prompt)."""
        b, t = ids.shape
        start, end = self.pos, self.pos + t
        if t > 1 and start > 0:
            raise ValueError("LlamaStepper: several tokens at once only as the prompt (the first call)")
        if end > self.max_len:
            raise ValueError(f"LlamaStepper: position {end} is past the {self.max_len} the cache was made for")
        x = self.inner.embed_tokens(ids)
        if t == 1 and self._plan is not None:
            self._pos_t.fill_(start)
            logits = self._compiled(x, self._pos_t, self._plan)
            self.pos = end
            return logits
        rope = {hd: (c[start:end], s[start:end]) for hd, (c, s) in self.rope.items()}
        causal = t > 1
        for n1, qkv, o, n2, gu, down, nh, nkv, hd, scale, kc, vc in self.layers:
            cos, sin = rope[hd]
            qk, v = qkv(self._norm(x, n1))
            qk = qk.view(b, t, nh + nkv, hd)
            half = hd // 2
            qk = (qk * cos + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin).transpose(1, 2)
            kc.narrow(2, start, t).copy_(qk[:, nh:])
            vc.narrow(2, start, t).copy_(v.view(b, t, nkv, hd).transpose(1, 2))
            a = F.scaled_dot_product_attention(qk[:, :nh], kc[:, :, :end], vc[:, :, :end],
                                               is_causal=causal, scale=scale, enable_gqa=nh != nkv)
            x = x + o(a.transpose(1, 2).reshape(b, t, nh * hd))
            g, u = gu(self._norm(x, n2))
            x = x + down(F.silu(g) * u)
        self.pos = end
        return self.model.lm_head(self._norm(x[:, -1:], self.inner.norm))
