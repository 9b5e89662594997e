"""`digits-mlp` and `digits-cnn`: small classifiers of scikit-learn's handwritten
digits (1,797 real 8x8 images, 16 grey levels), trained by shrink and cached.

Both take [N, 64] float inputs in [0, 1] (pixels / 16, as `digits_data()`
returns them) and give [N, 10] logits; the CNN reshapes to [N, 1, 8, 8] itself.
The split is stratified and seeded, so every run tests on the same images.

A cached model directory holds ``model.safetensors``, ``config.json`` (what
`build_digits_model` needs; loadable by path with `shrink.load(dir)`) and
``training.json`` (test accuracy, seconds).
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from shrink.fsutil import write_bytes_atomic, write_json_atomic
from shrink.models.io import build_cached, config_hash, deterministic, models_cache

DIGITS_NAMES = ("digits-mlp", "digits-cnn")
TRAINING_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "training.json")


@dataclass(frozen=True)
class DigitsSplit:
    x_train: torch.Tensor   # [N, 64] float32 in [0, 1]
    y_train: torch.Tensor   # [N] int64 in 0..9
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_data(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """The digits, split into train and test (stratified by class, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        d.data, d.target, test_size=test_fraction, random_state=seed, stratify=d.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return DigitsSplit(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


# ----------------------------------------------------------------------------- models

def digits_mlp(hidden: tuple[int, ...] = (128, 64)) -> nn.Sequential:
    layers, width = [], 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def digits_cnn(channels: tuple[int, ...] = (16, 32)) -> nn.Sequential:
    """Conv3x3 + BatchNorm + ReLU blocks at 8x8, a 2x2 max-pool, one Linear."""
    layers, c_in = [nn.Unflatten(1, (1, 8, 8))], 1
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c_in * 16, 10))


def build_digits_model(config: dict, where: str | Path = "config") -> nn.Sequential:
    """The untrained module a config.json describes ({"shrink_model": "digits-mlp", "hidden": [...]})."""
    name = config.get("shrink_model")
    key, build = {"digits-mlp": ("hidden", digits_mlp), "digits-cnn": ("channels", digits_cnn)}.get(name, (None, None))
    if build is None:
        raise ValueError(f"{where}: unknown shrink_model {name!r}; expected one of {', '.join(DIGITS_NAMES)}")
    sizes = config.get(key)
    if not (isinstance(sizes, list) and sizes and all(isinstance(s, int) and s > 0 for s in sizes)):
        raise ValueError(f"{where}: {name} needs {key!r}: a non-empty list of positive ints, got {sizes!r}")
    return build(tuple(sizes))


@dataclass(frozen=True)
class DigitsConfig:
    name: str = "digits-mlp"
    sizes: tuple[int, ...] | None = None   # hidden widths (mlp) or channels (cnn); None: the defaults
    epochs: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    test_fraction: float = 0.25

    def __post_init__(self):
        if self.name not in DIGITS_NAMES:
            raise ValueError(f"DigitsConfig.name must be one of {', '.join(DIGITS_NAMES)}, got {self.name!r}")
        for f in ("epochs", "batch_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"DigitsConfig.{f} must be an int >= 1, got {getattr(self, f)!r}")

    def model_config(self) -> dict:
        key = "hidden" if self.name == "digits-mlp" else "channels"
        default = (128, 64) if self.name == "digits-mlp" else (16, 32)
        return {"shrink_model": self.name, key: list(self.sizes or default),
                "input_shape": [64], "num_classes": 10, "input_scale": "pixels / 16"}

    def key(self) -> str:
        return config_hash({"config": asdict(self), "training_version": TRAINING_VERSION})


def default_config(name: str) -> DigitsConfig:
    if name == "digits-cnn":
        return DigitsConfig(name=name, epochs=30, batch_size=64, lr=3e-3)
    return DigitsConfig(name=name)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    try:
        return (model(x).argmax(dim=1) == y).double().mean().item()
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- training and cache

def train_digits(config: DigitsConfig, progress: Callable[[int], None] | None = None) -> tuple[nn.Module, dict]:
    """(trained model in eval mode, record). `progress(epoch)` after each epoch."""
    start = time.perf_counter()
    data = digits_data(config.seed, config.test_fraction)
    with deterministic(config.seed, threads=1):
        model = build_digits_model(config.model_config())
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        total = config.epochs * -(-len(data.y_train) // config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total)
        g = torch.Generator().manual_seed(config.seed)
        model.train()
        for epoch in range(config.epochs):
            order = torch.randperm(len(data.y_train), generator=g)
            for i in range(0, len(order), config.batch_size):
                idx = order[i:i + config.batch_size]
                if len(idx) < 2 and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                    continue  # BatchNorm needs two samples
                loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if progress is not None:
                progress(epoch + 1)
        model.eval()
    seconds = time.perf_counter() - start
    record = {
        "name": config.name, "key": config.key(), "config": asdict(config),
        "training_version": TRAINING_VERSION,
        "params": sum(p.numel() for p in model.parameters()),
        "train_samples": len(data.y_train), "test_samples": len(data.y_test),
        "train_accuracy": round(accuracy(model, data.x_train, data.y_train), 4),
        "test_accuracy": round(accuracy(model, data.x_test, data.y_test), 4),
        "final_train_loss": round(loss.item(), 4),
        "seconds": round(seconds, 2),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
    }
    return model, record


def save_digits(model: nn.Module, config: DigitsConfig, record: dict, directory: str | Path) -> Path:
    from safetensors.torch import save

    directory = Path(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(directory / "model.safetensors", save(state, metadata={"shrink_model": config.name}))
    write_json_atomic(directory / "config.json", config.model_config())
    write_json_atomic(directory / "training.json", record)
    return directory


def digits_dir(name: str, config: DigitsConfig | None = None, cache_dir: str | Path | None = None,
               progress: Callable[[int], None] | None = None) -> Path:
    config = config or default_config(name)
    if config.name != name:
        raise ValueError(f"digits_dir({name!r}) got a config for {config.name!r}")
    final = models_cache(cache_dir) / f"{name}-{config.key()}"

    def build(tmp: Path) -> None:
        model, record = train_digits(config, progress)
        save_digits(model, config, record, tmp)

    return build_cached(final, REQUIRED_FILES, build)


def load_digits_model(name: str, config: DigitsConfig | None = None, cache_dir: str | Path | None = None,
                      progress: Callable[[int], None] | None = None) -> nn.Module:
    """The trained classifier in eval mode (trained and cached on first use)."""
    import json

    from shrink.models.zoo import read_safetensors

    if name not in DIGITS_NAMES:
        raise ValueError(f"{name!r} is not a digits model; expected one of {', '.join(DIGITS_NAMES)}")
    directory = digits_dir(name, config, cache_dir, progress)
    model = build_digits_model(json.loads((directory / "config.json").read_text()), where=directory / "config.json")
    model.load_state_dict(read_safetensors(directory / "model.safetensors"))
    return model.eval()
