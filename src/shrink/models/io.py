"""Loading models by name or path, and the cache the built-in models are trained into.

`load(name_or_path)` returns an nn.Module in eval mode for:

- a built-in name (API.md): ``minilm``, ``tiny-gpt``, ``digits-mlp``, ``digits-cnn``;
- a Hugging Face model directory (config.json + weights);
- a weights file (``.safetensors``; ``.bin``/``.pt``/``.pth`` read with
  ``torch.load(weights_only=True)``) with a config.json beside it: a
  transformers config, or a shrink digits config;
- a ``.gguf`` file of the llama or gpt2 architecture (`shrink.models.gguf_read`),
  dequantized to float32, with its tokenizer rebuilt from the file's metadata;
- an ``.onnx`` file, run in ONNX Runtime (`shrink.models.onnx_model`), with the
  tokenizer saved beside it.

Nothing is downloaded: transformers is always called with local_files_only.

The cache: ``$SHRINK_CACHE`` if set, else ``~/.cache/shrink``; built-in models
live in ``<cache>/models/<name>-<hash of their training config>/``. A model is
built in a temporary directory beside its final place and renamed into it, under
a lock file, so a reader never sees half a model and two processes never train
the same one at once.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from shrink.models.checks import (check_finite_state, check_finite_tensor, check_layer_counts, check_layout,
                                  expected_layout, one_line,
                                  quiet_transformers, read_pickled_weights, read_safetensors, safetensors_header,
                                  state_layout)

BUILTIN_NAMES = ("minilm", "tiny-gpt", "digits-mlp", "digits-cnn")
TEXT_MODELS = ("minilm", "tiny-gpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


# ----------------------------------------------------------------------------- the cache

def cache_root() -> Path:
    env = os.environ.get("SHRINK_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shrink"


def models_cache(cache_dir: str | Path | None = None) -> Path:
    """Where built-in models are cached: `cache_dir` (a cache root) or `cache_root()`, + /models."""
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / "models"


def config_hash(obj) -> str:
    """12 hex digits naming a JSON-able training configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock held for the block; waits for another holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            f.seek(0)
            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s; keep waiting
                    continue
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def deterministic(seed: int, threads: int | None = None):
    """Seeded, deterministic torch for a training block; the caller's RNG state,
    deterministic-algorithms setting and (with `threads`) thread count are
    restored afterwards. One thread suits tiny models, whose steps are too small
    to share, and makes their bytes independent of the machine's core count."""
    was, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was)
            if threads is not None:
                torch.set_num_threads(was_threads)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def build_cached(final: Path, required: tuple[str, ...], build: Callable[[Path], None]) -> Path:
    """`final`, built by `build(tmp_dir)` unless it already holds the `required` files.

    Only the lock holder builds; temporary directories left by a killed build
    are removed by the next one. A directory missing a required file (someone
    deleted part of the cache) is rebuilt.
    """
    def complete() -> bool:
        return all((final / name).is_file() for name in required)

    if complete():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if complete():
            return final
        for stale in final.parent.glob(f".{final.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            build(tmp)
            _fsync_tree(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ----------------------------------------------------------------------------- names and paths

def _unknown(name_or_path, why: str) -> str:
    text = str(name_or_path)
    close = difflib.get_close_matches(text.lower(), BUILTIN_NAMES, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{text!r}: {why}; built-in models: {', '.join(BUILTIN_NAMES)}{hint}"


MAX_CONFIG_BYTES = 16 << 20   # a config.json (or an index) larger than this is not one


def _read_config(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes is too large for a JSON config "
                         f"(at most {MAX_CONFIG_BYTES:,}); it is not a model config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a valid JSON config ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a model config must be a JSON object")
    return config


def _hf_class(config: dict, where: Path):
    """The transformers class for a config: the named architecture if transformers
    has it, else AutoModelForCausalLM for causal LMs, else AutoModel."""
    import transformers

    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{where}: 'architectures' must be a list of class names, got {archs!r}")
    for arch in archs:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if "model_type" not in config:
        raise ValueError(f"{where}: config.json has neither a known 'architectures' entry nor a 'model_type'")
    if any(str(a).endswith("ForCausalLM") for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _hf_config(config: dict, config_file: Path):
    """transformers' config object; an unsupported architecture or a value transformers
    rejects is one ValueError naming config.json."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(f"{config_file}: unsupported architecture: model_type {model_type!r} "
                         f"(architectures {config.get('architectures')!r}) is not one transformers "
                         f"{transformers.__version__} knows; shrink loads models of the architectures "
                         "transformers supports (llama, gpt2, bert, ...)")
    try:
        with quiet_transformers():
            return transformers.AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a value the config class rejects: the user's file
        raise ValueError(f"{config_file}: transformers cannot read this config ({type(e).__name__}: "
                         f"{one_line(e)}); fix or replace the config.json") from None


def _meta_model(cls, hf_config, config_file: Path) -> torch.nn.Module:
    """The model a config describes, on the meta device (no memory): its tensor layout."""
    try:
        with torch.device("meta"), quiet_transformers():
            return cls._from_config(hf_config)
    except Exception as e:  # noqa: BLE001 - sizes the model class rejects: the user's config
        raise ValueError(f"{config_file}: cannot build the model it describes ({type(e).__name__}: "
                         f"{one_line(e)}); fix or replace the config.json") from None


def _check_against_model(weights: Path, found: dict, ref: torch.nn.Module, config_file: Path) -> None:
    """Shapes and floating dtypes of the file's tensors against the model of the config, and
    a config that declares far more weights than the file holds refused before anything is
    allocated (transformers would fill the missing ones with random values)."""
    expected = expected_layout(ref)
    prefix = getattr(ref, "base_model_prefix", None)
    check_layout(weights, found, expected, str(config_file), prefix=prefix)
    stored = sum(math.prod(s) for _, s in found.values())
    tensors = {id(t): t for t in (*ref.parameters(), *ref.buffers())}   # buffers: what __init__ allocates too
    declared = sum(math.prod(t.shape) for t in tensors.values())
    if declared > 2 * stored + (1 << 20):
        raise ValueError(f"{config_file}: describes a model of {declared:,} parameters but {weights} holds "
                         f"{stored:,} values; the weights and the config do not belong together")


def _load_hf_dir(path: Path) -> torch.nn.Module:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: a model directory needs a config.json")
    config = _read_config(config_file)
    if "shrink_model" in config:
        return _load_weights_with_config(_weights_in(path), config, config_file)
    shards = _safetensors_files(path)
    if not shards:   # only a pickled checkpoint: read it weights-only ourselves
        model = _load_weights_with_config(_weights_in(path), config, config_file)
        model.config.name_or_path = str(path)
        return model
    found: dict = {}
    for shard in shards:
        found.update(safetensors_header(shard))
    check_layer_counts(config, len(found), config_file, shards[0] if len(shards) == 1 else path)
    hf_config = _hf_config(config, config_file)
    cls = _hf_class(config, config_file)
    ref = _meta_model(_concrete_hf_class(cls, hf_config, config_file), hf_config, config_file)
    _check_against_model(shards[0] if len(shards) == 1 else path, found, ref, config_file)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot load the model's weights ({one_line(e)})") from None
    except (RuntimeError, ValueError) as e:  # shape mismatches, a safetensors error, a bad value
        raise ValueError(f"{path}: transformers cannot load the model ({one_line(e)})") from None
    if info["missing_keys"] or info.get("mismatched_keys"):
        raise _mismatch(path, config_file, info["missing_keys"], info.get("mismatched_keys") or [])
    for name, p in model.named_parameters():   # in memory now: no second read of the file
        check_finite_tensor(p, name, shards[0] if len(shards) == 1 else path)
    return model.eval()


def _safetensors_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards its index names (each a file in the directory)."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index_file = path / "model.safetensors.index.json"
    if not index_file.is_file():
        return []
    index = _read_config(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index_file}: 'weight_map' must map tensor names to shard file names")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        if Path(name).name != name or name in (".", "..") or not name.endswith(".safetensors"):
            raise ValueError(f"{index_file}: shard {name!r} is not a .safetensors file name in the model's "
                             "directory (paths are refused); fix the index")
        if not (path / name).is_file():
            raise FileNotFoundError(f"{index_file}: shard {name} is missing from {path}")
        shards.append(path / name)
    return shards


def _weights_in(path: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no model.safetensors (or pytorch_model.bin) in the directory")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_pickled_weights(path)


def _mismatch(weights: Path, config_file: Path, missing, unexpected) -> ValueError:
    missing, unexpected = sorted(missing, key=str), sorted(unexpected, key=str)
    return ValueError(
        f"{weights}: weights do not match the model of {config_file}: "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
    )


def _concrete_hf_class(cls, hf_config, config_file: Path):
    """An Auto class resolved to the model class for this config (Auto classes
    cannot build from a state dict alone)."""
    if not cls.__module__.startswith("transformers.models.auto"):
        return cls
    try:
        return cls._model_mapping[type(hf_config)]
    except (KeyError, AttributeError):
        raise ValueError(f"{config_file}: transformers has no {cls.__name__} for model_type "
                         f"{hf_config.model_type!r}") from None


def _load_weights_with_config(weights: Path, config: dict, config_file: Path) -> torch.nn.Module:
    if "shrink_model" in config:
        from shrink.models.digits import build_digits_model

        model = build_digits_model(config, where=config_file)   # cheap: checked before the weights are read
        state = _read_weights(weights)
        check_layout(weights, state_layout(state), expected_layout(model), str(config_file))
        check_finite_state(state, weights)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{weights}: weights do not fit the model of {config_file} ({one_line(e)})") from None
        if missing or unexpected:
            raise _mismatch(weights, config_file, missing, unexpected)
        return model.eval()

    if "model_type" not in config:
        raise ValueError(f"{config_file}: a transformers config needs a 'model_type'")
    found = safetensors_header(weights) if weights.suffix == ".safetensors" else None
    state = _read_weights(weights) if found is None else None   # a pickle: read (weights only) to see it
    check_layer_counts(config, len(found if found is not None else state), config_file, weights)
    hf_config = _hf_config(config, config_file)
    cls = _concrete_hf_class(_hf_class(config, config_file), hf_config, config_file)
    ref = _meta_model(cls, hf_config, config_file)
    _check_against_model(weights, found if found is not None else state_layout(state), ref, config_file)
    if state is None:
        state = _read_weights(weights)
    check_finite_state(state, weights)
    # from_pretrained with a state dict: built without a random init, tied weights tied, as from a directory
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(None, config=hf_config, state_dict=state, output_loading_info=True)
    except (RuntimeError, ValueError) as e:  # shape mismatches
        raise ValueError(f"{weights}: weights do not fit the model of {config_file} ({one_line(e)})") from None
    if info["missing_keys"] or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise _mismatch(weights, config_file, info["missing_keys"],
                        [*info["unexpected_keys"], *(info.get("mismatched_keys") or [])])
    return model.eval()


def _load_builtin(name: str, progress) -> torch.nn.Module:
    if name == "minilm":
        from shrink.models.zoo import minilm_dir

        return _load_hf_dir(minilm_dir())
    if name == "tiny-gpt":
        from shrink.models.tiny_gpt import load_tiny_gpt

        return load_tiny_gpt(progress=progress)[0]
    from shrink.models.digits import load_digits_model

    return load_digits_model(name, progress=progress)


def load(name_or_path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> torch.nn.Module:
    """A model in eval mode, by built-in name or path (see the module docstring).

    `tiny-gpt` and the digits models are trained on first use and cached;
    `progress(step)` reports training steps.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_NAMES:
        return _load_builtin(name_or_path, progress)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load: expected a name or a path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from shrink.models.compressed import is_compressed_dir, load_compressed

        for candidate in (path, path / "model"):  # a compressed model, or the DIR `shrink compress` wrote
            if is_compressed_dir(candidate):
                return load_compressed(candidate, build_builtin=lambda name: _load_builtin(name, None))
        return _load_hf_dir(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            from shrink.models.gguf_read import load_gguf

            return load_gguf(path)
        if suffix == ".onnx":
            from shrink.models.onnx_model import load_onnx

            return load_onnx(path)
        if suffix not in WEIGHT_SUFFIXES:
            raise ValueError(_unknown(path, f"unsupported file type {suffix or '(none)'}; expected a model "
                                      f"directory or a weights file ({', '.join(WEIGHT_SUFFIXES)}) with a config.json beside it"))
        config_file = path.parent / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: a weights file needs a config.json beside it ({config_file} is missing)")
        return _load_weights_with_config(path, _read_config(config_file), config_file)
    raise FileNotFoundError(_unknown(name_or_path, "no such file or directory, and not a built-in model name"))


def load_tokenizer(name_or_path: str | os.PathLike, progress: Callable[[int], None] | None = None):
    """The tokenizer of a text model: a built-in name, a model directory, a weights file's directory, or a .gguf file."""
    from transformers import AutoTokenizer

    if isinstance(name_or_path, str) and name_or_path in BUILTIN_NAMES:
        if name_or_path == "minilm":
            from shrink.models.zoo import minilm_dir

            path = minilm_dir()
        elif name_or_path == "tiny-gpt":
            from shrink.models.tiny_gpt import tiny_gpt_dir

            path = tiny_gpt_dir(progress=progress)
        else:
            raise ValueError(f"{name_or_path!r} is an image classifier with no tokenizer; text models: {', '.join(TEXT_MODELS)}")
    else:
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            from shrink.models.gguf_read import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        if path.is_file() and path.suffix.lower() == ".onnx":
            from shrink.models.onnx_model import load_onnx_tokenizer

            return load_onnx_tokenizer(path)
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise FileNotFoundError(_unknown(name_or_path, "no such file or directory, and not a built-in model name"))
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json or vocab.txt)")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (ValueError, FileNotFoundError) as e:
        if str(path) in str(e) and "\n" not in str(e).strip():
            raise
        raise ValueError(f"{path}: cannot load the tokenizer ({one_line(e)}); its files are corrupt or "
                         "incomplete: save the tokenizer again") from None
    except Exception as e:  # noqa: BLE001 - tokenizers' own errors on a corrupt tokenizer.json
        raise ValueError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {one_line(e)}); its files "
                         "are corrupt or incomplete: save the tokenizer again") from None


def is_causal_lm(model) -> bool:
    """A text generator: transformers gives it a generation_config, or its config names a
    *CausalLM / *LMHead architecture."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return hasattr(model, "generation_config") or any("CausalLM" in a or "LMHead" in a for a in archs)
