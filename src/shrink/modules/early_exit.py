"""Early exit for nn.Sequential classifiers (digits-mlp, digits-cnn): exit heads after
intermediate layers, and confidence-threshold inference (seed 004, "Dynamic & Adaptive
Computation": a sample leaves at the first exit whose confidence reaches the threshold).

Layers and stages. A *layer* is a child of the Sequential that holds weights (Linear,
Conv2d, or a compressed module in their place: QuantLinear, SparseLinear, ...); norms
(BatchNorm, LayerNorm) and activations, dropout included, belong to the layer before them.
digits-mlp has 3 layers (Linear+ReLU, Linear+ReLU, Linear), digits-cnn 3 (Conv+BN+ReLU
twice, then MaxPool, Flatten, Linear); the last layer is the final head. `exits` are layer
indices: an exit after layer k sees the output of k's activation. The Sequential is split
at the exits into stages: stage j runs up to exit j, the last stage to the final head.

Exit heads: a Linear on the stage's features; 4-D conv features [N, C, H, W] are first
average-pooled to a 2x2 grid (4C inputs: small, independent of the image size, and keeping
the coarse layout a digit's class depends on: a global average over the image measured
29% / 79% at digits-cnn's two exits against 86% / 98% for the 2x2 grid, the same head
training), other features flattened.

The base Sequential is kept whole as `self.base` (its parameters named `base.<i>...`),
so the full-depth path is the original model, computed by the same modules.

Threads: forward keeps its per-call state (the rows still undecided, the counts) in
locals and reads the threshold once, so one model may serve several threads. `recording()`
counts the calls of the thread that opened it only (a recorder per thread), and
`exit_macs()` counts its own calls only, whatever other threads run meanwhile.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

_ABSORBED = ("torch.nn.modules.activation", "torch.nn.modules.batchnorm", "torch.nn.modules.normalization",
             "torch.nn.modules.dropout", "torch.nn.modules.instancenorm")
POOLS = ("avg2x2", "flatten")
_RECORDERS_LOCK = threading.Lock()   # module level: a Lock attribute would make the model un-deep-copyable


def _absorbed(m: nn.Module) -> bool:
    """Norms, activations and dropout: they belong to the layer before them."""
    return type(m).__module__ in _ABSORBED


def _has_weights(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _unsupported(model: nn.Module, why: str) -> ValueError:
    return ValueError(f"early_exit supports nn.Sequential classifiers (digits-mlp, digits-cnn); "
                      f"{type(model).__name__}: {why}")


def sequential_layers(model: nn.Module) -> list[int]:
    """The child indices of the Sequential's layers (children holding weights, norms excluded)."""
    if not isinstance(model, nn.Sequential):
        raise _unsupported(model, "not an nn.Sequential (transformers models and other architectures have no "
                                  "exit points shrink can place)")
    layers = [i for i, m in enumerate(model) if _has_weights(m) and not _absorbed(m)]
    if len(layers) < 2:
        raise _unsupported(model, f"{len(layers)} layer(s) with weights; an exit needs at least one layer "
                                  "before the final head")
    return layers


def check_exits(model: nn.Sequential, exits: Sequence[int]) -> tuple[int, ...]:
    """The exits sorted and checked: layer indices before the final head."""
    n = len(sequential_layers(model))
    exits = tuple(sorted(set(exits)))
    bad = [e for e in exits if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n - 1]
    if not exits or bad:
        raise ValueError(f"early_exit: exits {list(exits)!r}: give layer indices in 0..{n - 2} (the model has {n} "
                         f"layers; layer {n - 1} is the final head)")
    return exits


def stage_ends(model: nn.Sequential, exits: Sequence[int]) -> list[int]:
    """For each exit, the child index where its stage ends (exclusive): after the exit's layer
    and the norms and activations that follow it."""
    layers = sequential_layers(model)
    ends = []
    for e in exits:
        i = layers[e] + 1
        while i < len(model) and _absorbed(model[i]):
            i += 1
        ends.append(i)
    return ends


def exit_width(model: nn.Sequential, layer: int) -> tuple[int, str]:
    """(features the exit head takes, pool) after layer `layer`: 4 x a conv's channels (average
    pooled to 2x2), a Linear's outputs (flattened)."""
    mod = model[sequential_layers(model)[layer]]
    if isinstance(getattr(mod, "out_channels", None), int):
        return 4 * mod.out_channels, "avg2x2"
    if isinstance(getattr(mod, "out_features", None), int):
        return mod.out_features, "flatten"
    raise _unsupported(model, f"layer {layer} ({type(mod).__name__}) has neither out_features nor out_channels: "
                              "cannot size its exit head")


class ExitHead(nn.Module):
    """pool (the average over each quarter of [N, C, H, W]: a 2x2 grid, or flatten) then Linear."""

    def __init__(self, in_features: int, classes: int, pool: str = "flatten"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"ExitHead: pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.pool = pool
        self.linear = nn.Linear(in_features, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg2x2":
            if h.dim() != 4:
                raise ValueError(f"ExitHead(pool='avg2x2') takes [N, C, H, W] features, got shape {tuple(h.shape)}")
            h = nn.functional.adaptive_avg_pool2d(h, 2)
        return self.linear(h.flatten(1))

    def describe(self) -> dict:
        return {"in_features": self.linear.in_features, "classes": self.linear.out_features, "pool": self.pool}


def _layer_macs(m: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a Linear- or Conv-like module (compressed ones too)."""
    if isinstance(getattr(m, "in_channels", None), int) and isinstance(getattr(m, "kernel_size", None), tuple):
        k = math.prod(m.kernel_size) * m.in_channels // getattr(m, "groups", 1)
        return int(out.numel()) * k
    return int(out.numel()) * int(m.in_features)


def _is_counted(m: nn.Module) -> bool:
    linear = isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
    conv = isinstance(getattr(m, "in_channels", None), int) and isinstance(getattr(m, "kernel_size", None), tuple)
    return linear or conv


@dataclass
class ExitStats:
    """Where the samples of the recorded calls left: counts[j] at exit j, counts[-1] at the
    final head. `layers_at[j]`: layers run by a sample leaving there; `macs_at[j]` (when
    known): its multiply-accumulates, the exit heads it passed included, against
    `base_macs` of the base model."""
    layers_at: tuple[int, ...]
    counts: list[int] = field(default_factory=list)
    calls: int = 0
    macs_at: tuple[int, ...] | None = None
    base_macs: int | None = None
    plain: int = 0   # samples the base ran alone (threshold >= 1 or training mode): no exit head ran

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * len(self.layers_at)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def fractions(self) -> list[float]:
        n = self.samples
        return [c / n if n else 0.0 for c in self.counts]

    def mean_stages(self) -> float:
        """Mean number of stages run (1 .. exits + 1)."""
        return sum((j + 1) * f for j, f in enumerate(self.fractions()))

    def mean_layers(self) -> float:
        return sum(l * f for l, f in zip(self.layers_at, self.fractions()))

    def depth_fraction(self) -> float:
        """Mean layers run over the model's layers (1.0: every sample ran full depth)."""
        return self.mean_layers() / self.layers_at[-1]

    def compute_fraction(self) -> float | None:
        """Mean MACs per sample over the base model's (exit heads' cost included; None: not known)."""
        if self.macs_at is None or not self.base_macs:
            return None
        if not self.samples:
            return 0.0
        total = sum(c * m for c, m in zip(self.counts, self.macs_at)) - self.plain * (self.macs_at[-1] - self.base_macs)
        return total / (self.samples * self.base_macs)

    def to_dict(self) -> dict:
        out = {"samples": self.samples, "calls": self.calls, "counts": list(self.counts),
               "fractions": self.fractions(), "mean_stages": self.mean_stages(),
               "mean_layers": self.mean_layers(), "depth_fraction": self.depth_fraction()}
        if self.macs_at is not None:
            out["compute_fraction"] = self.compute_fraction()
        return out


class EarlyExitModel(nn.Module):
    """A Sequential classifier with exit heads. In eval mode forward(x) runs stage by stage:
    rows whose exit-head top softmax probability is >= threshold leave with that head's
    logits, the rest go on (only the undecided rows are computed further); the result is
    [N, classes] logits in the input's row order, as the base model returns. threshold >= 1:
    no exit, the base model itself runs (the same outputs, bit for bit). In training mode,
    forward runs full depth; forward_all gives every exit's logits and the final's."""

    def __init__(self, base: nn.Sequential, exits: Sequence[int], heads: Sequence[nn.Module],
                 threshold: float = 0.9):
        super().__init__()
        exits = check_exits(base, exits)
        if len(heads) != len(exits):
            raise ValueError(f"EarlyExitModel: {len(exits)} exits but {len(heads)} heads")
        self.base = base
        self.heads = nn.ModuleList(heads)
        self.exits = exits
        self.ends = stage_ends(base, exits)
        self.n_layers = len(sequential_layers(base))
        self.threshold = threshold
        self.base_frozen = False   # train() keeps the base in eval mode (BatchNorm statistics untouched)
        self._recorders: dict[int, ExitStats] = {}   # thread id -> the stats its recording() block counts

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"EarlyExitModel: threshold must be a number >= 0 (>= 1: never exit), got {value!r}")
        self._threshold = float(value)

    @property
    def classes(self) -> int:
        return self.heads[0].linear.out_features

    def layers_at(self) -> tuple[int, ...]:
        return tuple(e + 1 for e in self.exits) + (self.n_layers,)

    def train(self, mode: bool = True) -> "EarlyExitModel":
        super().train(mode)
        if self.base_frozen:
            self.base.eval()
        return self

    def _stage(self, h: torch.Tensor, j: int) -> torch.Tensor:
        lo = 0 if j == 0 else self.ends[j - 1]
        hi = self.ends[j] if j < len(self.ends) else len(self.base)
        for m in list(self.base._modules.values())[lo:hi]:   # Sequential[i] costs microseconds per call
            h = m(h)
        return h

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, then the final head's: full depth for every row."""
        outs, h = [], x
        for j, head in enumerate(self.heads):
            h = self._stage(h, j)
            outs.append(head(h))
        outs.append(self._stage(h, len(self.heads)))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = self._threshold   # read once: a concurrent change applies from the next call
        if self.training or threshold >= 1.0:
            out = self.base(x)
            stats = self._recorder()
            if stats is not None:
                self._record([0] * len(self.heads) + [int(out.shape[0])])
                stats.plain += int(out.shape[0])
            return out
        n = int(x.shape[0])
        if n == 1:
            return self._forward_one(x, threshold)
        counts = [0] * (len(self.heads) + 1)
        idx = torch.arange(n, device=x.device)
        out, h = None, x
        for j, head in enumerate(self.heads):
            h = self._stage(h, j)
            logits = head(h)
            leave = logits.float().softmax(-1).amax(-1) >= threshold
            k = int(leave.sum())
            counts[j] = k
            if k == 0:
                continue
            if out is None:
                if k == n:   # every row leaves at the first exit that any leaves at
                    self._record(counts)
                    return logits
                out = logits.new_empty(n, logits.shape[-1])
            out[idx[leave]] = logits[leave]
            if k == idx.numel():
                self._record(counts)
                return out
            keep = ~leave
            h, idx = h[keep], idx[keep]
        final = self._stage(h, len(self.heads))
        counts[-1] = int(idx.numel())
        self._record(counts)
        if out is None:
            return final
        out[idx] = final.to(out.dtype)
        return out

    def _forward_one(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """One row: the same decisions as the batched path without its index bookkeeping."""
        counts = [0] * (len(self.heads) + 1)
        h = x
        for j, head in enumerate(self.heads):
            h = self._stage(h, j)
            logits = head(h)
            if float(logits.float().softmax(-1).amax()) >= threshold:
                counts[j] = 1
                self._record(counts)
                return logits
        counts[-1] = 1
        self._record(counts)
        return self._stage(h, len(self.heads))

    def _recorder(self) -> ExitStats | None:
        """The stats the calling thread's recording() block counts into (None: not recording)."""
        return self._recorders.get(threading.get_ident()) if self._recorders else None

    def _record(self, counts: list[int]) -> None:
        stats = self._recorder()
        if stats is not None:
            stats.calls += 1
            for j, c in enumerate(counts):
                stats.counts[j] += c

    @torch.no_grad()
    def exit_macs(self, x: torch.Tensor) -> tuple[tuple[int, ...], int]:
        """(MACs per row of a sample leaving at each exit, the final head last, exit heads
        passed included; MACs per row of the base model), counted on the rows of x by hooks
        on the Linear- and Conv-like modules."""
        tally: dict[int, int] = {}
        me = threading.get_ident()

        def count(mod, args, out):   # this call's modules only: other threads may run the model meanwhile
            if threading.get_ident() == me:
                tally[id(mod)] = tally.get(id(mod), 0) + _layer_macs(mod, out)

        hooks = []
        for m in self.modules():
            if _is_counted(m) and not any(_is_counted(c) for c in m.modules() if c is not m):
                hooks.append(m.register_forward_hook(count))
        was = self.training
        if was:
            self.eval()
        try:
            h, stage, head = x, [], []
            for j in range(len(self.heads) + 1):
                tally.clear()
                h = self._stage(h, j)
                stage.append(sum(tally.values()))
                if j < len(self.heads):
                    tally.clear()
                    self.heads[j](h)
                    head.append(sum(tally.values()))
        finally:
            for hk in hooks:
                hk.remove()
            if was:
                self.train(was)
        rows = max(1, int(x.shape[0]))
        at = [sum(stage[:j + 1]) + sum(head[:j + 1]) for j in range(len(self.heads))]
        at.append(sum(stage) + sum(head))
        return tuple(a // rows for a in at), sum(stage) // rows

    @contextlib.contextmanager
    def recording(self, macs: tuple[tuple[int, ...], int] | None = None) -> Iterator[ExitStats]:
        """Count where the samples leave in the calls this thread makes inside the block (calls
        from other threads are not counted); macs: exit_macs()'s result, for the compute fraction."""
        me = threading.get_ident()
        prev = self._recorders.get(me)
        stats = ExitStats(self.layers_at(), macs_at=None if macs is None else tuple(macs[0]),
                          base_macs=None if macs is None else int(macs[1]))
        with _RECORDERS_LOCK:   # writers one at a time; a new dict each time: forward reads without a lock
            self._recorders = {**self._recorders, me: stats}
        try:
            yield stats
        finally:
            with _RECORDERS_LOCK:
                rest = {k: v for k, v in self._recorders.items() if k != me}
                self._recorders = rest if prev is None else {**rest, me: prev}

    def describe(self) -> dict:
        """What a manifest needs to rebuild this wrapper around a fresh base."""
        return {"exits": list(self.exits), "threshold": self._threshold, "layers": self.n_layers,
                "heads": [h.describe() for h in self.heads]}

    @classmethod
    def shell(cls, base: nn.Sequential, entry: dict, where: str = "early_exit") -> "EarlyExitModel":
        """An EarlyExitModel of a describe() entry around `base`, with untrained heads (for
        load_state_dict to fill)."""
        try:
            heads = [ExitHead(int(h["in_features"]), int(h["classes"]), h.get("pool", "flatten"))
                     for h in entry["heads"]]
            model = cls(base, [int(e) for e in entry["exits"]], heads, float(entry["threshold"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: bad early_exit entry ({e!r}); expected exits, threshold and heads "
                             "[{in_features, classes, pool}]") from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for j, (e, h) in enumerate(zip(model.exits, heads)):
            width, pool = exit_width(base, e)
            if (h.linear.in_features, h.pool) != (width, pool):
                raise ValueError(f"{where}: exit head {j} takes {h.linear.in_features} features ({h.pool}), but "
                                 f"layer {e} of the base gives {width} ({pool})")
        return model


class ExitView(nn.Module):
    """One output of an EarlyExitModel as a model of its own: exit j's logits for every row
    (j = len(exits): the final head), so a quality metric scores each exit alone."""

    def __init__(self, model: EarlyExitModel, j: int):
        super().__init__()
        if not 0 <= j <= len(model.heads):
            raise ValueError(f"ExitView: exit {j} out of range 0..{len(model.heads)}")
        self.model, self.j = model, j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.j == len(self.model.heads):
            return self.model.base(x)
        h = x
        for j in range(self.j + 1):
            h = self.model._stage(h, j)
        return self.model.heads[self.j](h)
