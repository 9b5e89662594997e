"""Search across recipes to a budget: the candidate space, the constraints, the Pareto
front and the choice. Pure logic on measurements; running the trials is trials.py's.

The rule for "best": with a quality floor (--max-drop or --min-quality) the smallest
candidate that meets it and the size budget (then the better quality, then the lower
latency); with only a size budget, the best quality that fits (then the smaller)."""
from __future__ import annotations

from dataclasses import dataclass

SPACES = ("small", "default", "wide")


@dataclass(frozen=True)
class Constraints:
    max_size_bytes: int | None = None      # the tighter of --max-size and the device's room for weights
    max_drop: float | None = None          # percent of the baseline's quality
    min_quality: float | None = None       # in the metric's own units and direction (max perplexity)
    device: str | None = None

    def __post_init__(self):
        if self.max_drop is not None and not 0 <= self.max_drop < 100:
            raise ValueError(f"--max-drop must be a percentage in [0, 100), got {self.max_drop}")
        if self.max_size_bytes is not None and self.max_size_bytes <= 0:
            raise ValueError(f"the size budget must be positive, got {self.max_size_bytes} bytes")

    @property
    def has_floor(self) -> bool:
        return self.max_drop is not None or self.min_quality is not None

    def floor(self, baseline: dict) -> float | None:
        """The quality a candidate must reach (its metric's direction), or None."""
        higher = baseline.get("higher_is_better", True)
        bounds = []
        if self.max_drop is not None:
            q0 = baseline["value"]
            bounds.append(q0 * (1 - self.max_drop / 100) if higher else q0 * (1 + self.max_drop / 100))
        if self.min_quality is not None:
            bounds.append(self.min_quality)
        if not bounds:
            return None
        return max(bounds) if higher else min(bounds)

    def fits(self, size_bytes: int) -> bool:
        return self.max_size_bytes is None or size_bytes <= self.max_size_bytes

    def to_json(self, baseline: dict | None) -> dict:
        q = baseline or {}
        return {"max_size_bytes": self.max_size_bytes, "max_drop": self.max_drop, "min_quality": self.min_quality,
                "device": self.device, "quality_floor": None if not q else self.floor(q),
                "quality_name": q.get("name"), "higher_is_better": q.get("higher_is_better", True)}


def candidate_space(space: str = "default", calibrated: bool = True, labeled: bool = False) -> list[tuple[str, list]]:
    """(name, recipe) pairs across the families shrink has: integer precisions and group
    sizes by RTN, GPTQ and AWQ, k-means weight sharing, SmoothQuant W8A8 and mixed-precision
    budgets. Without calibration data (or a model without transformer blocks), only the
    data-free families. Pruning joins as its own family (Wanda, SparseGPT, 2:4, joint
    SparseGPT+int4, magnitude without data) and before quantization (prune -> GPTQ); the wide
    space adds structured removal (heads, layers) before 4-bit. Low-rank factorization joins
    (energy 0.95, and 0.9 with a fine-tune before int8 in the wide space). With labeled
    training data (the digits classifiers), the training families join: QAT at 4 bits,
    a distilled half-width student before int8, and (wide) a quarter-width one."""
    if space not in SPACES:
        raise ValueError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
    rtn = lambda b, g, sym=False: {"rtn": {"bits": b, "group_size": g, "symmetric": sym}}  # noqa: E731
    gptq = lambda b, g, **kw: {"gptq": {"bits": b, "group_size": g, **kw}}  # noqa: E731
    prune = lambda method, s: {"prune": {"method": method, "sparsity": s}}  # noqa: E731
    out = [("int8", [rtn(8, None, True)]), ("w4-rtn-g128", [rtn(4, 128)])]
    if calibrated:
        out += [("w4-gptq-g128", [gptq(4, 128)]), ("w3-gptq-g128", [gptq(3, 128)])]
        if space in ("default", "wide"):
            out += [("w8a8-smoothquant", [{"smoothquant": {"alpha": 0.5}}]),
                    ("w4-rtn-g32", [rtn(4, 32)]), ("w4-gptq-g32", [gptq(4, 32)]), ("w3-gptq-g32", [gptq(3, 32)]),
                    ("w4-awq-g128", [{"awq": {"bits": 4, "group_size": 128}}]),
                    ("kmeans16", [{"kmeans": {"clusters": 16}}]),
                    ("mixed-3.5", [{"mixed_precision": {"bits_per_weight": 3.5}}]),
                    ("mixed-5.0", [{"mixed_precision": {"bits_per_weight": 5.0}}])]
            out += [("prune50-wanda", [prune("wanda", 0.5)]), ("prune50-wanda+w4", [prune("wanda", 0.5), gptq(4, 128)]),
                    ("2:4-sparsegpt", [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}]),
                    ("prune50-sparsegpt-w4", [{"prune": {"method": "sparsegpt", "sparsity": 0.5, "bits": 4}}])]
        if space == "wide":
            out += [("prune30-sparsegpt", [prune("sparsegpt", 0.3)]), ("prune70-sparsegpt", [prune("sparsegpt", 0.7)]),
                    ("2:4-sparsegpt+w4", [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}, gptq(4, 128)]),
                    ("heads25+w4", [{"prune": {"method": "heads", "sparsity": 0.25}}, gptq(4, 128)]),
                    ("layers25+w4", [{"prune": {"method": "layers", "sparsity": 0.25}}, gptq(4, 128)])]
        if space == "wide":
            out += [("w3-rtn-g32", [rtn(3, 32)]), ("w4-gptq-g64-act", [gptq(4, 64, act_order=True)]),
                    ("w2-gptq-g32", [gptq(2, 32)]), ("w4-awq-g32", [{"awq": {"bits": 4, "group_size": 32}}]),
                    ("kmeans8", [{"kmeans": {"clusters": 8}}]), ("kmeans32", [{"kmeans": {"clusters": 32}}]),
                    ("mixed-3.0", [{"mixed_precision": {"bits_per_weight": 3.0}}]),
                    ("mixed-4.25", [{"mixed_precision": {"bits_per_weight": 4.25}}])]
        if space in ("default", "wide"):
            out += [("lowrank-e0.95", [{"lowrank": {"energy": 0.95}}])]
        if space == "wide":
            out += [("lowrank-e0.9+ft+int8", [{"lowrank": {"energy": 0.9, "finetune": {"steps": 100}}},
                                               rtn(8, None, True)])]
    else:
        out += [("kmeans16", [{"kmeans": {"clusters": 16}}])]
        if space in ("default", "wide"):
            out += [("w4-rtn-g32", [rtn(4, 32)]), ("w3-rtn-g32", [rtn(3, 32)]), ("w4-rtn-channel", [rtn(4, None)]),
                    ("kmeans8", [{"kmeans": {"clusters": 8}}]), ("prune50-magnitude", [prune("magnitude", 0.5)]),
                    ("prune50-magnitude+int8", [prune("magnitude", 0.5), rtn(8, None, True)])]
        if space == "wide":
            out += [("w2-rtn-g32", [rtn(2, 32)]), ("w3-rtn-g128", [rtn(3, 128)]), ("kmeans32", [{"kmeans": {"clusters": 32}}]),
                    ("w8-rtn-g128", [rtn(8, 128)]), ("kmeans4", [{"kmeans": {"clusters": 4}}])]
    if labeled and space in ("default", "wide"):
        out += [("w4-qat", [{"qat": {"bits": 4, "epochs": 3}}]),
                ("distill-half+int8", [{"distill": {"student": {"width": 0.5}, "epochs": 20}}, rtn(8, None, True)])]
        if space == "wide":
            out += [("w2-qat-g32", [{"qat": {"bits": 2, "group_size": 32, "epochs": 5}}]),
                    ("distill-quarter+int8", [{"distill": {"student": {"width": 0.25}, "epochs": 30}},
                                              rtn(8, None, True)])]
    return out


def pareto_front(points: list[tuple[float, ...]]) -> list[bool]:
    """Which points no other point dominates (every objective minimized: <= in all, < in one)."""
    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))
    return [not any(dominates(q, p) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]


def objectives(c: dict, higher: bool, with_latency: bool = True) -> tuple[float, ...]:
    q = c["quality"]["value"]
    obj = (float(c["size_bytes"]), -q if higher else q)
    return obj + (float(c["latency_ms"]),) if with_latency and c.get("latency_ms") is not None else obj


def meets(c: dict, cons: Constraints, floor: float | None, higher: bool) -> bool:
    if not cons.fits(c["size_bytes"]):
        return False
    if floor is None or c.get("quality") is None:
        return floor is None
    q = c["quality"]["value"]
    return q >= floor if higher else q <= floor


def choose(cands: list[dict], cons: Constraints, floor: float | None, higher: bool) -> dict | None:
    """The best feasible candidate by the module's rule, or None."""
    ok = [c for c in cands if meets(c, cons, floor, higher)]
    if not ok:
        return None
    sign = 1 if higher else -1
    lat = lambda c: c.get("latency_ms") if c.get("latency_ms") is not None else float("inf")  # noqa: E731
    if cons.has_floor:
        return min(ok, key=lambda c: (c["size_bytes"], -sign * c["quality"]["value"], lat(c)))
    return min(ok, key=lambda c: (-sign * c["quality"]["value"], c["size_bytes"], lat(c)))


def closest(cands: list[dict], cons: Constraints, higher: bool) -> dict | None:
    """When nothing is feasible: the best quality among those within the size budget, else the smallest."""
    scored = [c for c in cands if c.get("quality") is not None]
    if not scored:
        return None
    within = [c for c in scored if cons.fits(c["size_bytes"])]
    if within:
        return max(within, key=lambda c: c["quality"]["value"] if higher else -c["quality"]["value"])
    return min(scored, key=lambda c: c["size_bytes"])


def shortlist(cands: list[dict], cons: Constraints, floor: float | None, higher: bool, k: int) -> list[dict]:
    """The proxy-stage candidates worth a full evaluation, at most k: those within the size
    budget on the size x quality front that meet `floor` (the caller loosens it, the proxy
    being noisy), smallest first; without a floor the front by quality; then, to fill k,
    the next best by quality."""
    ok = [c for c in cands if c.get("quality") is not None and cons.fits(c["size_bytes"])]
    if not ok:
        ok = [c for c in cands if c.get("quality") is not None]
    front = [c for c, f in zip(ok, pareto_front([objectives(c, higher, False) for c in ok])) if f]
    sign = 1 if higher else -1
    if floor is not None:
        good = sorted((c for c in front if meets(c, Constraints(), floor, higher)), key=lambda c: c["size_bytes"])
    else:
        good = sorted(front, key=lambda c: -sign * c["quality"]["value"])
    rest = sorted((c for c in ok if c not in good), key=lambda c: -sign * c["quality"]["value"])
    return (good + rest)[:k]
