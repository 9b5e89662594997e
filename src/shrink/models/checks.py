"""Checks on a model's files before their contents are trusted (DESIGN.md §7).

Every reader of a user's file calls these before it builds anything from the file, so a
corrupt, truncated or hostile file is refused with one ValueError naming the file, the
tensor or field, and what to do, never a crash deeper down or an allocation sized by a
number the file declares:

- `safetensors_header(path)`: names, dtypes and shapes of a .safetensors file, read through
  safetensors' own validating parser (every length and offset checked, nothing loaded);
- `expected_layout(model)` / `check_layout(...)`: the file's tensors against the model its
  config describes (built on the meta device: no memory): shapes, and floating weights
  stored as floating point (exact dtypes for shrink's own compressed files);
- `check_finite_file` / `check_finite_state` / `check_finite_tensor`: NaN or inf weights,
  named, streamed one tensor at a time;
- `read_pickled_weights(path)`: a .bin/.pt/.pth with `torch.load(weights_only=True)` only;
  one that needs arbitrary objects is refused with how to convert it;
- `quiet_transformers()`: transformers' load reports and bars off while shrink checks its
  result itself, so an error is one line.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

_REDOWNLOAD = "export or download it again"
# safetensors dtype names -> torch dtypes (those torch has)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_CHUNK = 1 << 22   # elements per finiteness check: bounded temporary memory


def one_line(text: object, limit: int = 300) -> str:
    """The first line of a library's message, shortened: CLI errors are one line."""
    lines = [s.strip() for s in str(text).strip().splitlines() if s.strip()]
    first = lines[0] if lines else type(text).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


MAX_JSON_BYTES = 16 << 20   # a config, manifest or index larger than this is not one


def read_json_object(path: str | Path, what: str = "JSON file") -> dict:
    """A JSON object from a file: a missing, oversized, non-UTF-8, malformed, too deeply nested
    or non-object file is one ValueError (FileNotFoundError) naming it."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes is too large for a {what}")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a valid {what} ({one_line(e)})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a {what} must be a JSON object, got {type(doc).__name__}")
    return doc


# ----------------------------------------------------------------------------- safetensors

def safetensors_header(path: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a .safetensors file, every header length and offset checked
    by safetensors' parser; ValueError naming the file when it is not a valid one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                dtype = s.get_dtype()
                if dtype not in ST_DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which shrink does not read; "
                                     "store the weights as F32, F16 or BF16")
                out[name] = (ST_DTYPES[dtype], tuple(s.get_shape()))
    except (SafetensorError, OSError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({one_line(e)}); the file is truncated or "
                         f"corrupt: {_REDOWNLOAD}") from None
    return out


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, after its header is checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({one_line(e)}); {_REDOWNLOAD}") from None


# ----------------------------------------------------------------------------- pickles

def read_pickled_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint read with `torch.load(weights_only=True)`: plain tensors only,
    never code. One that needs arbitrary Python objects is refused with how to convert it."""
    import pickle

    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise ValueError(
                f"{path}: the checkpoint needs arbitrary Python objects to unpickle, and unpickling them can run "
                "code, so shrink refuses it; if you trust its source, convert it to safetensors in a trusted "
                "session: python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load('{path.name}', weights_only=False), 'model.safetensors')\"") from None
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({one_line(e)}); {_REDOWNLOAD}") from None
    except Exception as e:  # noqa: BLE001 - torch.load's zip, pickle and storage errors: a corrupt file
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {one_line(e)}); "
                         f"{_REDOWNLOAD}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: expected a state dict (tensor names -> tensors), got "
                         f"{type(state).__name__}; save model.state_dict() or convert it to safetensors")
    return state


# ----------------------------------------------------------------------------- layouts

def expected_layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{state-dict name: (shape, dtype)} of a model (usually built on the meta device)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}


def _match(key: str, expected: dict, prefix: str | None) -> str | None:
    if key in expected:
        return key
    if prefix:
        for cand in (key.removeprefix(prefix + "."), f"{prefix}.{key}"):
            if cand != key and cand in expected:
                return cand
    return None


def check_layout(path: Path, found: dict[str, tuple[torch.dtype, tuple[int, ...]]], expected: dict,
                 source: str, *, prefix: str | None = None, exact: bool = False) -> None:
    """The tensors in `found` ({name: (dtype, shape)}) fit the model `source` describes:
    shapes equal, a floating weight stored as floating point; with `exact` (shrink's own
    files) every dtype equal and no tensor the model lacks."""
    for key, (dtype, shape) in found.items():
        name = _match(key, expected, prefix)
        if name is None:
            if exact:
                raise ValueError(f"{path}: tensor {key!r} is not part of the model {source} describes; "
                                 "the files do not belong together")
            continue
        want_shape, want_dtype = expected[name]
        if tuple(shape) != tuple(want_shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {list(shape)}, the model {source} describes "
                             f"needs {list(want_shape)}; the weights and the config do not belong together")
        if exact and dtype != want_dtype:
            raise ValueError(f"{path}: tensor {key!r} is {str(dtype).removeprefix('torch.')}, {source} "
                             f"needs {str(want_dtype).removeprefix('torch.')}; the file is corrupt: {_REDOWNLOAD}")
        if want_dtype.is_floating_point and not dtype.is_floating_point:
            raise ValueError(f"{path}: weight {key!r} is stored as {str(dtype).removeprefix('torch.')}, not as "
                             "floating point; the file is corrupt or not these weights: store them as F32, "
                             "F16 or BF16")


def state_layout(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")


def check_layer_counts(config: dict, n_tensors: int, config_file: object, weights: object) -> None:
    """A config's layer counts against the tensors its weights hold (every layer has at least
    one): building a model of millions of declared layers takes minutes even on the meta
    device, so such a config is refused first."""
    for key in _LAYER_KEYS:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > n_tensors:
            raise ValueError(f"{config_file}: {key} is {v:,} but {weights} holds only {n_tensors:,} tensors; "
                             "the config does not belong to these weights")


# ----------------------------------------------------------------------------- finite values

def check_finite_tensor(t: torch.Tensor, name: str, path: object) -> None:
    """ValueError naming the file and tensor when a floating tensor holds NaN or inf."""
    if not t.is_floating_point() or t.device.type == "meta":
        return
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        if part.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            part = part.float()
        if torch.isfinite(part.sum()):   # fast: any NaN/inf makes the sum non-finite (so may overflow)
            continue
        bad = ~torch.isfinite(part)
        if bad.any():
            n = int(bad.sum()) + sum(int((~torch.isfinite(flat[s:s + _CHUNK].float())).sum())
                                     for s in range(start + _CHUNK, flat.numel(), _CHUNK))
            i = start + int(torch.nonzero(bad)[0])
            index = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), t.shape)) if t.dim() else ()
            raise ValueError(f"{path}: tensor {name!r} of shape {list(t.shape)} holds {n} NaN/inf value(s) "
                             f"(first at index {list(index)}: {flat[i].item()}); the weights are corrupt or the "
                             "model diverged: fix or replace them before loading")


def check_finite_state(state: dict[str, torch.Tensor], path: object) -> None:
    for name, t in state.items():
        check_finite_tensor(t, name, path)


def check_finite_file(path: str | Path) -> None:
    """Every floating tensor of a (header-checked) .safetensors file is finite; one tensor in
    memory at a time."""
    from safetensors import SafetensorError, safe_open

    header = safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for name, (dtype, _) in header.items():
                if dtype.is_floating_point:
                    check_finite_tensor(f.get_tensor(name), name, path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({one_line(e)}); {_REDOWNLOAD}") from None


# ----------------------------------------------------------------------------- transformers

@contextlib.contextmanager
def quiet_transformers():
    """transformers' load reports (printed before shrink raises its own one-line error) and
    progress bars off for the block; the previous settings come back afterwards."""
    try:
        from transformers.utils import logging
    except ImportError:
        yield
        return
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# ----------------------------------------------------------------------------- compressed directories

_MAX_DIM = 1 << 31
_GEOMETRY = ("kernel_size", "stride", "padding", "dilation")
# manifest module type -> required fields and their kinds
_ENTRY_FIELDS = {
    "QuantLinear": {"in_features": "dim", "out_features": "dim", "bias": "bool", "spec": "spec"},
    "W8A8Linear": {"in_features": "dim", "out_features": "dim", "bias": "bool", "smoothed": "bool"},
    "QuantConv2d": {"in_channels": "dim", "out_channels": "dim", "groups": "dim", "padding_mode": "str",
                    "bias": "bool", "spec": "spec", **{g: "geometry" for g in _GEOMETRY}},
    "SparseLinear": {"in_features": "dim", "out_features": "dim", "layout": "str", "nnz": "count",
                     "bias": "bool", "dtype": "dtype"},
    "SparseQuantLinear": {"in_features": "dim", "out_features": "dim", "bias": "bool", "spec": "spec",
                          "layout": "str", "nnz": "count"},
    "SparseQuantConv2d": {"in_channels": "dim", "out_channels": "dim", "groups": "dim", "padding_mode": "str",
                          "bias": "bool", "spec": "spec", "layout": "str", "nnz": "count",
                          **{g: "geometry" for g in _GEOMETRY}},
    "SparseConv2d": {"in_channels": "dim", "out_channels": "dim", "groups": "dim", "padding_mode": "str",
                     "layout": "str", "nnz": "count", "bias": "bool", "dtype": "dtype",
                     **{g: "geometry" for g in _GEOMETRY}},
    "LowRankLinear": {"in_features": "dim", "out_features": "dim", "rank": "dim", "bias": "bool", "dtype": "dtype"},
    "LoRALinear": {"in_features": "dim", "out_features": "dim", "rank": "dim", "alpha": "number", "bias": "bool",
                   "dtype": "dtype", "base": "str"},
}
_OPTIONAL_FIELDS = {"input_scaled": "bool", "weight_dtype": "dtype", "source": "str", "dropout": "number",
                    "merged": "bool", "n": "dim?", "m": "dim?"}
_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind_ok(kind: str, v) -> bool:
    if kind == "dim":
        return _is_int(v) and 1 <= v < _MAX_DIM
    if kind == "dim?":
        return v is None or (_is_int(v) and 1 <= v < _MAX_DIM)
    if kind == "count":
        return _is_int(v) and 0 <= v < 1 << 40
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e30
    if kind == "dtype":
        return v in _DTYPE_NAMES
    if kind == "spec":
        return isinstance(v, dict)
    if kind == "geometry":
        return v in ("same", "valid") or (isinstance(v, list) and len(v) == 2
                                           and all(_is_int(x) and 0 <= x < 1 << 16 for x in v))
    raise AssertionError(kind)


_KIND_NAMES = {"dim": "a positive integer", "dim?": "a positive integer or null", "count": "an integer >= 0",
               "bool": "true or false", "str": "a string", "number": "a number", "spec": "a QuantSpec object",
               "dtype": f"one of {', '.join(_DTYPE_NAMES)}", "geometry": "a pair of integers"}


def _dense_size(entry: dict) -> int:
    """Weights a module entry stands for (its dense size): what building it may allocate."""
    if "in_features" in entry:
        dense = entry["in_features"] * entry["out_features"]
        rank = entry.get("rank", 0)
        return dense + rank * (entry["in_features"] + entry["out_features"])
    kernel = entry["kernel_size"] if isinstance(entry["kernel_size"], list) else [1, 1]
    return entry["in_channels"] * entry["out_channels"] * kernel[0] * kernel[1] // entry["groups"]


def check_manifest(manifest, where: Path, weights: list[Path] = ()) -> dict:
    """A compressed directory's manifest.json, every field the loader reads of the right
    type and range, and the modules it lists not larger than the weights files could hold
    (no allocation sized by a number in the manifest); ValueError naming the file and the
    key otherwise."""
    from shrink.models.compressed import spec_from_dict

    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: a manifest must be a JSON object, got {type(manifest).__name__}")
    base = manifest.get("base")
    if not isinstance(base, dict) or base.get("kind") not in ("hf", "builtin"):
        raise ValueError(f"{where}: 'base' must be {{\"kind\": \"hf\"}} or {{\"kind\": \"builtin\", \"name\": ...}}, "
                         f"got {base!r}")
    if base["kind"] == "builtin" and not isinstance(base.get("name"), str):
        raise ValueError(f"{where}: base.name must be a built-in model's name, got {base.get('name')!r}")
    if base["kind"] == "hf" and not (base.get("class") is None or (isinstance(base["class"], str)
                                                                  and base["class"].isidentifier())):
        raise ValueError(f"{where}: base.class must be a transformers class name, got {base.get('class')!r}")
    for key in ("resized", "early_exit"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise ValueError(f"{where}: {key!r} must be an object, got {type(manifest[key]).__name__}")
    modules = manifest.get("modules", {})
    if modules is None:
        modules = {}
    if not isinstance(modules, dict):
        raise ValueError(f"{where}: 'modules' must map module names to entries, got {type(modules).__name__}")
    for name, entry in modules.items():
        at = f"{where}: module {name}"
        if not name or not all(part.isidentifier() or part.isdigit() for part in name.split(".")):
            raise ValueError(f"{at}: not a module name (dot-separated identifiers)")
        if not isinstance(entry, dict):
            raise ValueError(f"{at}: must be an object, got {type(entry).__name__}")
        kind = entry.get("type")
        if not isinstance(kind, str) or kind not in _ENTRY_FIELDS:
            raise ValueError(f"{at}: unknown module type {kind!r}; known: {', '.join(_ENTRY_FIELDS)}")
        for field, want in _ENTRY_FIELDS[kind].items():
            if field not in entry:
                raise ValueError(f"{at}: {kind} entry lacks {field!r}")
            if want == "dtype" and entry[field] not in _DTYPE_NAMES:
                raise ValueError(f"{at}: {kind} entry: {field} {entry[field]!r} is not one of {', '.join(_DTYPE_NAMES)}")
            if not _kind_ok(want, entry[field]):
                raise ValueError(f"{at}: {field!r} must be {_KIND_NAMES[want]}, got {entry[field]!r}")
        for field, want in _OPTIONAL_FIELDS.items():
            if field in entry and not _kind_ok(want, entry[field]):
                raise ValueError(f"{at}: {field!r} must be {_KIND_NAMES[want]}, got {entry[field]!r}")
        if "spec" in entry:
            try:
                spec_from_dict(entry["spec"], at)
            except ValueError as e:
                raise ValueError(str(e) if str(e).startswith(str(where)) else f"{at}: {one_line(e)}") from None
            except (TypeError, KeyError, OverflowError, AttributeError) as e:
                raise ValueError(f"{at}: bad QuantSpec ({type(e).__name__}: {one_line(e)})") from None
    config_file = Path(where).parent / "config.json"
    if weights and base["kind"] == "hf" and config_file.is_file() and config_file.stat().st_size < 16 << 20:
        import json

        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{config_file}: not a valid JSON config ({one_line(e)})") from None
        if isinstance(config, dict):
            check_layer_counts(config, sum(len(safetensors_header(w)) for w in weights), config_file, weights[0])
    if weights:
        # even 1-bit codes or a 90%-sparse layer store far more than 1/64 byte per weight
        size = sum(w.stat().st_size for w in weights)
        dense = sum(_dense_size(e) for e in modules.values())
        if dense > 64 * size + (1 << 20):
            raise ValueError(f"{where}: its modules stand for {dense:,} weights, far more than the weights "
                             f"({size:,} bytes) could hold; the manifest is corrupt or does not belong to them")
    return manifest


def check_compressed_layout(model: torch.nn.Module, weights: list[Path], where: Path, modules: dict) -> None:
    """The tensors of a compressed model's file(s) are exactly those of the model its manifest
    describes (built on the meta device where the modules allow, so nothing is allocated
    first): names, shapes and dtypes; tied weights may be stored once."""
    found: dict = {}
    for path in weights:
        for name, entry in safetensors_header(path).items():
            found[name] = (entry, path)
    expected = model.state_dict(keep_vars=True)
    for key, ((dtype, shape), path) in found.items():
        if key not in expected:
            raise ValueError(f"{path}: tensor {key!r} is not part of the model {where} describes; the weights "
                             "and the manifest do not belong together")
        want = expected[key]
        if tuple(shape) == tuple(want.shape) and dtype == want.dtype:
            continue
        owner = max((n for n in modules if key.startswith(n + ".")), key=len, default=None)
        if owner is None:
            what = f"{where}: the model expects {key}"
        else:
            e = modules[owner]
            detail = f" {e['layout']}, nnz={e['nnz']}" if "nnz" in e else ""
            what = f"{where}: module {owner} ({e['type']}{detail}) expects {key}"
        if tuple(shape) != tuple(want.shape):
            raise ValueError(f"{what} of shape {list(want.shape)}, but {path.name} holds {list(shape)}: the "
                             "manifest (or shape) does not match the weights")
        raise ValueError(f"{what} as {str(want.dtype).removeprefix('torch.')}, but {path.name} holds "
                         f"{str(dtype).removeprefix('torch.')}: the file is corrupt; {_REDOWNLOAD}")
    stored = {id(expected[n]) for n in found}
    missing = [n for n, t in expected.items() if n not in found and id(t) not in stored]
    if missing:
        raise ValueError(f"{weights[0]}: tensors the manifest {where} implies are missing: {sorted(missing)[:5]}"
                         f"{'...' if len(missing) > 5 else ''}; the weights and the manifest do not belong together")
