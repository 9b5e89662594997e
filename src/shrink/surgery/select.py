"""Choose the modules a compression step works on.

`select_modules(model)` walks the model once and returns a `Selection`: the
weight-carrying modules to compress (`targets`) and the ones a user could have
meant but that were left alone, each with the reason (`skipped`) — a module
is never dropped without a word.

Every target exposes its weight as a [out, in] matrix (`Target.weight_view()`),
whatever the storage: transformers' GPT-2 `Conv1D` keeps [in, out], a Conv2d
keeps [out, in/groups, kh, kw]. Algorithms then see one layout.

Nothing here modifies the model.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

SUPPORTED_TYPES = ("linear", "conv1d", "conv2d", "sparse_linear", "sparse_conv2d")
# Layers already quantized (QuantLinear, QuantConv2d): selected only when asked for by type
# (a QAT step refines an earlier PTQ step's result); their weight_view() is the dequantized copy.
QUANTIZED_TYPES = ("quant_linear", "quant_conv2d")
# The LM output head by the names transformers uses for it; heads are found
# by tying and get_output_embeddings() too, the names catch the untied ones.
HEAD_NAMES = ("lm_head", "embed_out")

Pattern = str | re.Pattern


@dataclass(frozen=True)
class Target:
    """A module to compress, with its weight seen as [out_features, in_features].

    kind: "linear" (nn.Linear), "conv1d" (transformers' Conv1D: a linear layer
    that stores its weight as [in, out]), "conv2d" (nn.Conv2d; in_features is
    in_channels/groups * kh * kw), "sparse_linear" / "sparse_conv2d" (a pruned
    SparseLinear / SparseConv2d: weight_view() is its dense copy) or "embedding"
    (rows are tokens).
    aliases: other qualified names under which the same module, or a module
    holding the same weight Parameter (tied weights), is reachable.
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    kind: str
    out_features: int
    in_features: int
    aliases: tuple[str, ...] = ()

    def weight_view(self) -> torch.Tensor:
        """The weight as a [out, in] tensor that shares storage with the module's.

        In-place edits of the view (under torch.no_grad()) change the module.
        """
        if self.kind in ("sparse_linear", "sparse_conv2d"):  # a pruned layer: its dense equivalent (a copy)
            return self.module.dense_weight()
        if self.kind in QUANTIZED_TYPES:  # a quantized layer: its dequantized weight (a copy)
            return self.module.dequantized_weight().reshape(self.out_features, self.in_features)
        w = self.module.weight
        if self.kind == "conv1d":
            return w.t()
        if self.kind == "conv2d":
            return w.view(w.shape[0], -1)  # conv weights are contiguous: a true view
        return w

    def set_weight(self, w: torch.Tensor) -> None:
        """Write a [out, in] matrix back into the module, in its own layout and dtype."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.name}: new weight has shape {tuple(w.shape)}, "
                f"expected [out, in] = [{self.out_features}, {self.in_features}]"
            )
        if self.kind in ("sparse_linear", "sparse_conv2d") + QUANTIZED_TYPES:
            raise ValueError(f"{self.name}: a {self.kind} layer's weight is stored compressed; replace the module "
                             "instead")
        with torch.no_grad():
            self.weight_view().copy_(w)


@dataclass(frozen=True)
class Skipped:
    """A module that matched the selection by name or type but is not a target."""

    name: str
    type_name: str
    reason: str


@dataclass(frozen=True)
class Selection:
    targets: tuple[Target, ...]
    skipped: tuple[Skipped, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]


def kind_of(module: nn.Module) -> str | None:
    """The kind of a module as `select_modules` names it, or None if unsupported."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "SparseLinear" and callable(getattr(module, "dense_weight", None)):
        return "sparse_linear"
    if type(module).__name__ == "SparseConv2d" and callable(getattr(module, "dense_weight", None)):
        return "sparse_conv2d"
    # transformers' Conv1D, recognised by shape rather than imported: transformers
    # is an optional dependency and importing it costs seconds.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and _is_param(module, "weight"):
        if module.weight.dim() == 2 and module.weight.shape[1] == module.nf:
            return "conv1d"
    return None


def quantized_kind_of(module: nn.Module) -> str | None:
    """"quant_linear" / "quant_conv2d" for shrink's quantized layers (by name: modules sits
    below surgery, but the duck type is what the targets use), else None."""
    if not callable(getattr(module, "dequantized_weight", None)) or not hasattr(module, "spec"):
        return None
    return {"QuantLinear": "quant_linear", "SparseQuantLinear": "quant_linear",
            "QuantConv2d": "quant_conv2d", "SparseQuantConv2d": "quant_conv2d"}.get(type(module).__name__)


def _is_param(module: nn.Module, attr: str) -> bool:
    return isinstance(getattr(module, attr, None), nn.Parameter)


def _dims(module: nn.Module, kind: str) -> tuple[int, int]:
    if kind in ("sparse_linear", "sparse_conv2d") or kind in QUANTIZED_TYPES:
        return int(module.out_features), int(module.in_features)
    w = module.weight
    if kind == "conv1d":
        return int(w.shape[1]), int(w.shape[0])
    if kind == "conv2d":
        return int(w.shape[0]), int(w[0].numel())
    return int(w.shape[0]), int(w.shape[1])


def _compile(patterns: Pattern | Iterable[Pattern] | None, what: str) -> list[re.Pattern] | None:
    """Globs match the whole qualified name; "re:..." strings and compiled patterns are searched."""
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    out = []
    for p in patterns:
        if isinstance(p, re.Pattern):
            out.append(p)
        elif isinstance(p, str):
            if p.startswith("re:"):
                try:
                    out.append(re.compile(p[3:]))
                except re.error as e:
                    raise ValueError(f"{what}: bad regular expression {p!r}: {e}") from None
            else:
                out.append(re.compile(fnmatch.translate(p)))  # translate() anchors at both ends
        else:
            raise TypeError(f"{what}: patterns are strings or re.Pattern, got {type(p).__name__}")
    return out


def _matches(name: str, patterns: list[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def _head_modules(model: nn.Module, named: dict[str, nn.Module]) -> set[int]:
    """ids of modules that are the model's output head."""
    heads = {id(m) for n, m in named.items() if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except (AttributeError, NotImplementedError):  # some models do not define it
            out = None
        if isinstance(out, nn.Module):
            heads.add(id(out))
    # A weight tied to an input embedding is the head of a tied LM, whatever its name.
    embedding_weights = {id(m.weight) for m in named.values() if isinstance(m, nn.Embedding)}
    for m in named.values():
        if not isinstance(m, nn.Embedding) and _is_param(m, "weight") and id(m.weight) in embedding_weights:
            heads.add(id(m))
    return heads


def select_modules(
    model: nn.Module,
    *,
    types: Iterable[str] = SUPPORTED_TYPES,
    include: Pattern | Iterable[Pattern] | None = None,
    exclude: Pattern | Iterable[Pattern] | None = None,
    include_embeddings: bool = False,
    include_head: bool = False,
) -> Selection:
    """Pick the modules to compress, in model order.

    types: kinds to take, among "linear", "conv1d" (transformers' Conv1D),
        "conv2d", "sparse_linear", "sparse_conv2d", and the already quantized "quant_linear",
        "quant_conv2d" (only when named here). Embeddings are taken with
        include_embeddings=True instead.
    include / exclude: patterns on the qualified name (e.g. "model.layers.0.mlp.up_proj").
        A string is an fnmatch glob matched against the whole name ("*.q_proj"),
        unless it starts with "re:" — then it is a regular expression searched
        in the name ("re:layers\\.[0-3]\\."); compiled re.Patterns are searched
        too. With include=None every module of a chosen kind is a candidate;
        with include given, every module owning parameters whose name matches
        is one. exclude removes candidates, silently: that is what it asks for.
    include_embeddings / include_head: nn.Embedding modules and the output head
        (named lm_head/embed_out, returned by get_output_embeddings(), or holding
        a weight tied to an input embedding) are skipped unless asked for.

    A module (or weight Parameter) reachable under several names is reported
    once, under its first name, with the others in Target.aliases; a later
    candidate holding an already-selected weight is listed in `skipped`.
    Candidates that cannot be targets (unsupported type, kind not in `types`,
    embedding or head not asked for, tied to a selected weight) are listed in
    `skipped` with the reason.
    """
    types = tuple(types)
    unknown = [t for t in types if t not in SUPPORTED_TYPES + QUANTIZED_TYPES]
    if unknown:
        raise ValueError(f"select_modules: unknown types {unknown}; supported: "
                         f"{list(SUPPORTED_TYPES + QUANTIZED_TYPES)}")
    quantized = any(t in QUANTIZED_TYPES for t in types)
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude") or []

    named = dict(model.named_modules())  # deduplicated: a shared module appears once
    aliases: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    # Tied weights: the same Parameter held by different modules.
    holders: dict[int, list[str]] = {}
    for n, m in named.items():
        if _is_param(m, "weight"):
            holders.setdefault(id(m.weight), []).append(n)

    def weight_id(m: nn.Module) -> int:  # a SparseLinear has no .weight: the module stands for it
        return id(getattr(m, "weight", m))
    heads = _head_modules(model, named)

    targets: list[Target] = []
    skipped: list[Skipped] = []
    taken: dict[int, str] = {}  # id(weight) -> name of the target that holds it
    for name, module in named.items():
        kind = kind_of(module)
        if kind is None and quantized:
            kind = quantized_kind_of(module)
        if name == "":
            if kind is not None:  # a bare nn.Linear "model": there is no parent to swap it in
                skipped.append(Skipped(name, type(module).__name__, "the model itself cannot be replaced in place"))
            continue
        if inc is None:
            if kind is None:
                continue
        elif not _matches(name, inc) or not (any(True for _ in module.parameters(recurse=False))
                                             or (quantized and quantized_kind_of(module) is not None)):
            continue
        if exc and _matches(name, exc):
            continue
        type_name = type(module).__name__

        def skip(reason: str) -> None:
            skipped.append(Skipped(name, type_name, reason))

        if kind is None:
            skip(f"{type_name} is not a supported type (supported: {', '.join(SUPPORTED_TYPES)}, Embedding)")
        elif id(module) in heads and not include_head:
            skip("output head; pass include_head=True to compress it")
        elif kind == "embedding" and not include_embeddings:
            skip("embedding; pass include_embeddings=True to compress it")
        elif kind != "embedding" and kind not in types and id(module) not in heads:
            skip(f"kind {kind!r} is not in types={list(types)}")
        elif weight_id(module) in taken:
            skip(f"weight is tied to {taken[weight_id(module)]!r}, which is selected (reported once)")
        else:
            others = [a for a in aliases.get(id(module), []) if a != name]
            others += [h for h in holders.get(weight_id(module), []) if h != name and h not in others]
            out_f, in_f = _dims(module, kind)
            targets.append(Target(name, module, kind, out_f, in_f, tuple(others)))
            taken[weight_id(module)] = name
    return Selection(tuple(targets), tuple(skipped))
