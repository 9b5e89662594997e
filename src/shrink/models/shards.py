"""Sharded safetensors: read a model's tensors one at a time from memory-mapped shards,
write tensors out shard by shard, and load a sharded directory into a model.

The layout is Hugging Face's: `model.safetensors` alone, or `model-0000k-of-0000N.safetensors`
files with `model.safetensors.index.json` ({"metadata": {"total_size": ...}, "weight_map":
{tensor name: file name}}). Nothing here holds more than the tensors asked for: a shard
is opened with safe_open (a read-only memory map) for each read and closed after it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def has_weights(directory: str | Path) -> bool:
    """A single model.safetensors or a sharded index in `directory`."""
    d = Path(directory)
    return (d / SINGLE).is_file() or (d / INDEX).is_file()


class ShardReader:
    """{tensor name: shard file} of a model directory; `get(name)` reads one tensor.

    Checks the index against the shards' own headers (every listed name is in the file
    the index names, every shard's tensors are listed) before anything is read."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            from shrink.models.checks import read_json_object

            doc = read_json_object(index, "safetensors index")   # size, UTF-8, nesting depth checked
            try:
                weight_map = doc["weight_map"]
            except KeyError as e:
                raise ValueError(f"{index}: not a safetensors index ({e}); expected "
                                 "{\"weight_map\": {tensor: file}}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise FileNotFoundError(f"{self.directory}: no {SINGLE} or {INDEX}; a model directory needs its "
                                    "safetensors weights")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        self.where: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if Path(name).name != name or not path.is_file():
                raise FileNotFoundError(f"{index}: shard {name!r} is missing from {self.directory}")
            self.files[name] = path
            try:
                with _open(path) as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.shapes[key] = (tuple(sl.get_shape()), sl.get_dtype())
                        self.where[key] = name
            except Exception as e:  # safetensors raises its own error types for a corrupt header
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if weight_map is not None:
            wrong = [k for k, v in weight_map.items() if self.where.get(k) != v]
            extra = [k for k in self.where if k not in weight_map]
            if wrong or extra:
                raise ValueError(f"{index}: the index does not match the shards' headers (listed but not in "
                                 f"their file: {wrong[:3]}, in a shard but not listed: {extra[:3]})")

    def names(self) -> list[str]:
        return list(self.where)

    def nbytes(self, name: str) -> int:
        shape, dtype = self.shapes[name]
        n = 1
        for s in shape:
            n *= s
        return n * _DTYPE_BYTES.get(dtype, 4)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, read with pread(2) into memory of its own: only its bytes. (The
        default memory map is private and copy-on-write: the whole shard would count as the
        process's own data, and stay mapped while any tensor from it lives.)"""
        if name not in self.where:
            raise KeyError(f"{self.directory}: no tensor {name!r} in the weights")
        with _open(self.files[self.where[name]]) as f:
            return f.get_tensor(name)


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:   # safetensors before 0.7 has no pread backend
        return safe_open(str(path), framework="pt")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class ShardWriter:
    """Collects tensors and writes them to `directory` shard by shard: a shard is written
    (to a temporary name, fsynced, renamed) before the pending tensors would pass
    `max_shard_bytes`, so at most max(max_shard_bytes, the largest tensor) is held. `close()` names the shards model-0000k-of-0000N,
    writes the index, and returns it. `directory` is expected to be a private temporary
    directory that the caller moves into place when everything is written."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 256 * 2**20):
        self.directory = Path(directory)
        self.max_shard_bytes = int(max_shard_bytes)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.metadata: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in keys for _, keys in self.written):
            raise ValueError(f"ShardWriter: tensor {name!r} written twice")
        t = tensor.detach().contiguous()
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_shard_bytes:
            self.flush()   # held at once: at most max(max_shard_bytes, the largest tensor)
        self.pending[name] = t
        self.pending_bytes += n
        self.total += n
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        k = len(self.written) + 1
        final = self.directory / f".shard-{k:05d}.safetensors"
        tmp = final.with_name(final.name + ".tmp")
        save_file(self.pending, str(tmp), metadata={"format": "pt", **self.metadata})
        _fsync_file(tmp)
        os.replace(tmp, final)
        self.written.append((final, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict:
        self.flush()
        n = len(self.written)
        weight_map = {}
        for k, (path, keys) in enumerate(self.written, 1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.directory / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total, "format": "pt", **self.metadata}, "weight_map": weight_map}
        tmp = self.directory / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _fsync_file(tmp)
        os.replace(tmp, self.directory / INDEX)
        return index


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a directory: model.safetensors, or the shards its index lists."""
    d = Path(directory)
    if (d / SINGLE).is_file():
        return [d / SINGLE]
    return list(ShardReader(d).files.values())


def load_weights(model: nn.Module, directory: str | Path) -> tuple[set, list]:
    """Load model.safetensors, or every shard in turn, into `model` (non-strict);
    (missing, unexpected) as safetensors.torch.load_model gives them: a name tied to a
    loaded tensor (a tied LM head) is not missing."""
    from safetensors.torch import _remove_duplicate_names, load_file, load_model

    d = Path(directory)
    if (d / SINGLE).is_file():
        return load_model(model, str(d / SINGLE), strict=False)
    found: set[str] = set()
    unexpected: list[str] = []
    for path in ShardReader(d).files.values():
        state = load_file(str(path))
        found.update(state)
        _, unexp = model.load_state_dict(state, strict=False)
        unexpected += unexp
        del state
    missing = set(model.state_dict()) - found
    for group in _remove_duplicate_names(model.state_dict(), preferred_names=found).values():
        for name in group:
            if name in missing:
                missing.remove(name)
            elif name in found:
                unexpected.append(name)
    return missing, unexpected

