"""Quantize a model that does not fit in memory: one decoder block at a time, streamed from
its memory-mapped safetensors shards, written out shard by shard.

The model is built from its config on the meta device (no memory). Then, for each block
in order: its tensors are read from the shards into the block's own modules, the recipe's
step quantizes it with the very functions an in-memory run uses (`run._data_free` for
rtn/kmeans, `run._gptq` for gptq: the SequentialRunner, the Hessian collector, GPTQ and
`install`), its compressed tensors go to the shard writer, and its memory is given back
(every tensor of the block, and of the float layers it replaced, goes back to meta). For
GPTQ the block is loaded by a forward pre-hook when the runner first calls it, and the
block before it is written and freed at that moment: by then that block has produced
the next block's inputs. The calibration batches enter through the embeddings, which are
loaded (with the rotary tables) for that; the LM head and the final norm are never
loaded whole into the model: they are copied from the input shards to the output.

The result equals `shrink compress` of the same model and recipe tensor for tensor: the
same float weights enter the same code in the same order (tests/recipe/test_stream.py).

Supported: decoder-only transformers whose config.json names a transformers class of
the Llama family (llama, mistral, qwen2) or GPT-2, with safetensors weights (one
model.safetensors or shards with model.safetensors.index.json). Streamable recipes: one
quantize step that works layer by layer from the weights (rtn, kmeans) or block by
block from calibration activations (gptq). Anything else is refused with the reason."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from shrink.fsutil import replace_dir
from shrink.quant import check_finite
from shrink.surgery import find_blocks, select_modules

from .records import StepRecord, model_nbytes, model_params
from .rules import check_order
from .steps import GPTQ, RTN, KMeans, parse_recipe, step_to_dict

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "gpt2")
STREAMABLE_STEPS = (RTN, KMeans, GPTQ)
MAX_SHARD_BYTES = 256 * 2**20


def unstreamable_recipe(steps: list) -> str | None:
    """Why a recipe cannot be streamed, or None when it can."""
    if len(steps) != 1 or not isinstance(steps[0], STREAMABLE_STEPS):
        names = ", ".join(next(iter(step_to_dict(s))) for s in steps) or "(empty)"
        return (f"the recipe ({names}) is not streamable: streaming runs one rtn, kmeans or gptq step "
                "(e.g. w4-rtn, int8, w4-gptq)")
    return None


def unstreamable_model(model_dir: str | Path) -> str | None:
    """Why a model reference cannot be streamed (not a directory of safetensors weights with a
    config of a supported architecture), or None when it can."""
    from shrink.models.shards import has_weights

    d = Path(str(model_dir)).expanduser()
    if not d.is_dir() or not (d / "config.json").is_file():
        return f"{model_dir}: streaming needs a model directory with config.json"
    if not has_weights(d):
        return f"{d}: streaming needs safetensors weights (model.safetensors or shards with an index)"
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{d / 'config.json'}: unreadable ({e})"
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind not in SUPPORTED_TYPES:
        return (f"{d / 'config.json'}: model_type {kind!r} cannot be streamed; streaming supports "
                f"{', '.join(SUPPORTED_TYPES)} decoders")
    return None


def stream_compress(model_dir: str | Path, recipe, out: str | Path, *, calibration: list | None = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES, progress=None, extra: dict | None = None,
                    force: bool = False) -> dict:
    """Compress the model in `model_dir` with `recipe` block by block into the compressed
    directory `out` (written to a temporary sibling, moved into place when complete).
    calibration: the input batches (gptq needs them). Returns {"recipe", "steps",
    "baseline", "compressed", "size_reduction", "warnings"} with sizes only (no quality)."""
    steps = parse_recipe(recipe)
    warnings = check_order(steps, force=force)
    for why in (unstreamable_recipe(steps), unstreamable_model(model_dir)):
        if why:
            raise ValueError(why)
    step = steps[0]
    if isinstance(step, GPTQ) and not calibration:
        raise ValueError("gptq needs calibration batches (calibration=[...]) to stream a model")
    from shrink.models.shards import ShardReader, ShardWriter

    _return_freed_memory()
    src = Path(str(model_dir)).expanduser()
    reader = ShardReader(src)
    model = _skeleton(src)
    streamer = _Streamer(model, reader, step)
    baseline = _skeleton_size(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        streamer.writer = ShardWriter(tmp, max_shard_bytes)
        t0 = time.perf_counter()
        rec = streamer.run(calibration, progress)
        rec.seconds = time.perf_counter() - t0
        streamer.write_stem()
        from shrink.models.compressed import FORMAT, VERSION

        model.config.save_pretrained(tmp)
        manifest = {"format": FORMAT, "version": VERSION, "base": {"kind": "hf", "class": type(model).__name__},
                    "modules": streamer.modules, **(extra or {}), "streamed": True}
        streamer.writer.metadata = streamer.tied_metadata
        streamer.writer.close()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    compressed = {k: baseline[k] - streamer.float_blocks[k] + streamer.packed_blocks[k] for k in baseline}
    return {"recipe": [step_to_dict(s) for s in steps], "steps": [rec.to_dict()], "baseline": baseline,
            "compressed": compressed, "size_reduction": baseline["size_bytes"] / compressed["size_bytes"],
            "warnings": warnings}


def _return_freed_memory() -> None:
    """glibc serves allocations under its (adaptive, up to 32 MiB) mmap threshold from the heap,
    where a freed block's weights stay with the process: block after block the heap only grows.
    A fixed 1 MiB threshold maps every weight-sized tensor on its own, and freeing it unmaps it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):   # not glibc: nothing to tune
        pass


def _skeleton(src: Path) -> nn.Module:
    """The model as from_pretrained builds it, on the meta device (no memory)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
    cls = next((getattr(transformers, a, None) for a in (config.architectures or [])
                if isinstance(getattr(transformers, a, None), type)), None)
    if cls is None:
        raise ValueError(f"{src / 'config.json'}: 'architectures' names no transformers class "
                         f"({config.architectures}); streaming builds the model from it")
    with torch.device("meta"):
        model = cls._from_config(config)
    return model.eval()


class _Streamer:
    def __init__(self, model: nn.Module, reader, step):
        from .run import _unsupported, _worth_listing

        self.model, self.reader, self.step = model, reader, step
        self.path, blocks = find_blocks(model)
        self.prefixes = [f"{self.path}.{i}." for i in range(len(blocks))]
        types = ("linear", "conv1d", "conv2d", "sparse_linear")   # as run.compress picks for a quantize step
        sel = select_modules(model, types=types, include=step.include, exclude=step.exclude)
        self.rec = StepRecord(index=1, step=step_to_dict(step))
        self.rec.skipped = [{"name": s.name, "reason": s.reason} for s in sel.skipped if _worth_listing(s)]
        self.targets = []
        for t in sel.targets:
            why = _unsupported(step, t)
            if why is not None:
                self.rec.skipped.append({"name": t.name, "reason": why})
            elif not any(t.name.startswith(p) for p in self.prefixes):
                raise ValueError(f"{t.name} lies outside the repeated blocks ({self.path}): it cannot be streamed; "
                                 "exclude it from the step or compress in memory")
            else:
                self.targets.append(t)
        # Tied weights (a GPT-2 head is its embedding): one Parameter under several names.
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        self.tied = {n: g for g in groups.values() if len(g) > 1 for n in g}
        self.tied_ids = {i for i, g in groups.items() if len(g) > 1}
        # save_model keeps the first name in sorted order and notes the others in the header
        self.tied_metadata = {n: sorted(g)[0] for g in groups.values() if len(g) > 1 for n in sorted(g)[1:]}
        self.state_names = list(model.state_dict())
        self.modules: dict[str, dict] = {}
        # size_bytes and params of the blocks as loaded and as compressed (model_nbytes, model_params)
        self.float_blocks = {"size_bytes": 0, "params": 0}
        self.packed_blocks = {"size_bytes": 0, "params": 0}
        self.loaded = [False] * len(blocks)
        self.finished = [False] * len(blocks)
        self.writer = None

    # ---------------------------------------------------------------- loading and freeing

    def _load(self, names: list[str]) -> None:
        """Read `names` from the shards into the skeleton (a tied name: every holder)."""
        done = set()
        for name in names:
            if name in done:
                continue
            group = self.tied.get(name, [name])
            present = [n for n in group if n in self.reader.where]
            if not present:
                raise ValueError(f"{self.reader.directory}: the weights have no tensor {name!r}; "
                                 "they do not match the config")
            t = self.reader.get(present[0])
            if t.is_floating_point():
                check_finite(t, f"weight {present[0]}")
            _assign(self.model, group, t)
            done.update(group)

    def _materialize(self, module: nn.Module, prefix: str) -> None:
        # Buffers not in the checkpoint (rotary inv_freq) are computed as from_pretrained computes them.
        for m in module.modules():
            if m._non_persistent_buffers_set and any(b is not None for b in m._buffers.values()):
                m.to_empty(device="cpu", recurse=False)
                self.model._init_weights(m)
        names = [n for n, _ in module.named_parameters(prefix=prefix.rstrip("."))]
        names += [prefix + n for n in module.state_dict() if prefix + n not in names]
        self._load(names)
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"{prefix.rstrip('.')}: {left[:3]} are neither in the weights nor computable; "
                             "this architecture cannot be streamed")

    def load_block(self, i: int) -> None:
        block = self.model.get_submodule(self.prefixes[i].rstrip("."))
        self._materialize(block, self.prefixes[i])
        _add_size(self.float_blocks, block)
        self.loaded[i] = True

    def finish_block(self, i: int) -> None:
        """Write block i's compressed tensors and manifest entries, then free it."""
        from shrink.models.compressed import compressed_modules

        name = self.prefixes[i].rstrip(".")
        block = self.model.get_submodule(name)
        _add_size(self.packed_blocks, block)
        for k, v in compressed_modules(block).items():
            self.modules[f"{name}.{k}"] = v
        for k, v in block.state_dict().items():
            self.writer.add(f"{name}.{k}", v)
        _free(block)
        for t in self.targets:   # the float layers the step replaced still hold their weights
            if t.name.startswith(self.prefixes[i]):
                _free(t.module)
        self.finished[i] = True

    # ---------------------------------------------------------------- the step

    def run(self, calibration, progress) -> StepRecord:
        from .run import _data_free, _gptq

        n = len(self.prefixes)
        done = [0]
        total = len(self.targets)

        def report(_k, _n):
            done[0] += 1
            if progress:
                progress(f"step 1 {next(iter(self.rec.step))} (streamed)", done[0], total)

        if not isinstance(self.step, GPTQ):
            for i in range(n):
                self.load_block(i)
                _data_free(self.model, self.step, [t for t in self.targets if t.name.startswith(self.prefixes[i])],
                           self.rec, report)
                self.finish_block(i)
            return self.rec
        self._load_stem()

        def on_call(i):
            def hook(_m, _args):
                if not self.loaded[i]:
                    if i > 0 and not self.finished[i - 1]:
                        self.finish_block(i - 1)
                    self.load_block(i)
            return hook

        blocks = [self.model.get_submodule(p.rstrip(".")) for p in self.prefixes]
        handles = [b.register_forward_pre_hook(on_call(i)) for i, b in enumerate(blocks)]
        try:
            _gptq(self.model, self.step, self.targets, calibration, self.rec, report)
        finally:
            for h in handles:
                h.remove()
        for i in range(n):
            if not self.finished[i]:
                if not self.loaded[i]:
                    raise RuntimeError(f"{self.prefixes[i]}: the calibration run never reached this block")
                self.finish_block(i)
        return self.rec

    def _stem_modules(self) -> list[tuple[str, nn.Module]]:
        """Top-level pieces outside the blocks that the forward needs up to the first block:
        everything except the untied output head (and the block list)."""
        head = self.model.get_output_embeddings()
        tied = head is not None and any(id(p) in self.tied_ids for p in head.parameters())
        out = []
        for name, m in self.model.named_modules():
            if name == self.path or name.startswith(self.path + ".") or (head is m and not tied):
                continue
            if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
                out.append((name, m))
        return out

    def _load_stem(self) -> None:
        for name, m in self._stem_modules():
            if any(m._buffers.get(b) is not None for b in m._non_persistent_buffers_set):
                m.to_empty(device="cpu", recurse=False)   # rotary tables: computed as from_pretrained does
                self.model._init_weights(m)
            pre = f"{name}." if name else ""
            names = [pre + n for n, p in m._parameters.items() if p is not None]
            names += [pre + n for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
            self._load(names)

    def write_stem(self) -> None:
        """Every tensor outside the blocks, from the model where loaded, else straight from the shards."""
        state = self.model.state_dict()
        written = set()
        for name in self.state_names:
            if any(name.startswith(p) for p in self.prefixes) or name in self.tied_metadata:
                continue
            t = state[name]
            if t.is_meta:
                present = [n for n in self.tied.get(name, [name]) if n in self.reader.where]
                if not present:
                    raise ValueError(f"{self.reader.directory}: the weights have no tensor {name!r}")
                t = self.reader.get(present[0])
                if t.is_floating_point():
                    check_finite(t, f"weight {present[0]}")
            self.writer.add(name, t)
            written.add(name)
        del state


def _skeleton_size(model: nn.Module) -> dict:
    """model_nbytes and model_params of a model on the meta device (whose tensors have no
    addresses to tell shared ones apart by: they are told apart by identity)."""
    from .records import _is_index_buffer

    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    params = {id(p): p for p in model.parameters()}
    return {"size_bytes": sum(t.numel() * t.element_size() for t in tensors.values() if not _is_index_buffer(t)),
            "params": sum(p.numel() for p in params.values())}


def _add_size(acc: dict, block: nn.Module) -> None:
    acc["size_bytes"] += model_nbytes(block)
    acc["params"] += model_params(block)


def _assign(model: nn.Module, names: list[str], t: torch.Tensor) -> None:
    """Put tensor t under every name of a group (tied names share one Parameter)."""
    param = None
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        m = model.get_submodule(mod_name)
        if attr in m._parameters:
            if param is None:
                old = m._parameters[attr]
                param = nn.Parameter(t, requires_grad=old.requires_grad if old is not None else False)
            m._parameters[attr] = param
        elif attr in m._buffers:
            m._buffers[attr] = t
        else:
            raise ValueError(f"{name}: the model has no parameter or buffer of that name")


def _free(module: nn.Module) -> None:
    """Give a module's memory back: every parameter and buffer becomes a meta tensor of the
    same shape and dtype, and tensors kept as plain attributes (kernel caches) are dropped."""
    for m in module.modules():
        for k, v in list(m._parameters.items()):
            if v is not None and not v.is_meta:
                m._parameters[k] = nn.Parameter(torch.empty_like(v, device="meta"), requires_grad=v.requires_grad)
        for k, v in list(m._buffers.items()):
            if v is not None and not v.is_meta:
                m._buffers[k] = torch.empty_like(v, device="meta")
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v)):
                object.__setattr__(m, k, None)
