"""Sequential calibration: stream calibration batches through a model block by block.

GPTQ-style methods calibrate block i on the outputs of the *already
compressed* blocks 0..i-1, and never hold more than one block's activations.
This file does that for any model whose forward runs a list of blocks one
after the other — transformers' BERT, GPT-2, Llama, ... and plain
nn.Sequential models — with one loop, no per-architecture code:

1. `find_blocks` finds the list of repeated layers (model.layers,
   transformer.h, encoder.layer, or a Sequential's children).
2. `capture_block_inputs` runs the model on each batch with a forward
   pre-hook on the first block that records what the model passes it
   (hidden states and whatever else: attention masks, position ids, rotary
   (cos, sin)) and then stops the forward, so only the embeddings run.
3. `SequentialRunner.run` then, for each block: feeds the inputs of the chosen
   target modules inside it to a callback (Hessians, activation statistics),
   lets `process_block` compress the block, and re-runs the compressed block
   to produce the next block's inputs.

The non-hidden arguments recorded at the first block (masks, position
embeddings) are reused for every block: a transformers model computes them
once and passes the same objects to every layer. Models whose layers differ
by `config.layer_types` (sliding-window vs full attention) get the arguments
of the first block of each type.

Memory: one hidden-state tensor per calibration batch (block i's outputs
replace its inputs batch by batch), the arguments captured once, and one
batch's activations inside the block being run. Everything stays on the
device the model put it on; nothing is offloaded.

Nothing here changes the model except what `process_block` does; training
mode is set to eval for the run and restored afterwards.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from shrink.surgery.select import Selection, Target, select_modules

OnInput = Callable[[str, torch.Tensor], None]
ProcessBlock = Callable[[int, nn.Module, list[Target]], None]
Progress = Callable[[int, int], None]


class _StopForward(Exception):
    """Raised by the capture hook once the blocks' inputs are recorded: the rest of the forward is not needed."""


@dataclass(frozen=True)
class BlockCall:
    """How the model calls a block, apart from the hidden states.

    hidden_key: None when the hidden states are the first positional
    argument, else the keyword they were passed under.
    """

    args: tuple
    kwargs: dict = field(default_factory=dict)
    hidden_key: str | None = None

    def __call__(self, block: nn.Module, hidden: torch.Tensor):
        if self.hidden_key is None:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, **{**self.kwargs, self.hidden_key: hidden})


@dataclass(frozen=True)
class BlockInputs:
    """One calibration batch at the entrance of the first block.

    by_type: for models whose blocks differ by layer type, the call of the
    first block of each type (key: config.layer_types entry); empty otherwise.
    """

    hidden: torch.Tensor
    call: BlockCall
    by_type: dict = field(default_factory=dict)


# ---------------------------------------------------------------- finding blocks

def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, list[nn.Module]]:
    """(qualified name of the block list, the blocks in order).

    The block list is the outermost nn.ModuleList/nn.Sequential of two or more
    modules of one type, all with parameters (the longest if several); a
    repeated unit inside a block (attention heads, experts) is never chosen.
    Failing that, a model that is itself an nn.Sequential is run child by
    child. `path` names the list explicitly when the guess is wrong.
    """
    if path is not None:
        try:
            container = model.get_submodule(path)
        except AttributeError as e:
            raise KeyError(f"find_blocks: {type(model).__name__} has no submodule {path!r} ({e})") from None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            raise ValueError(f"find_blocks: {path!r} is a {type(container).__name__}, "
                             "not a non-empty nn.ModuleList or nn.Sequential")
        return path, list(container)

    found = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0:
            children = list(m)
            if len({type(c) for c in children}) == 1 and all(_has_params(c) for c in children):
                found.append((name, children))

    def nested(name: str) -> bool:
        return any(o != name and (o == "" or name.startswith(o + ".")) for o, _ in found)

    outer = [(n, c) for n, c in found if not nested(n)]
    repeated = [(n, c) for n, c in outer if len(c) >= 2]
    if repeated:
        return max(repeated, key=lambda nc: len(nc[1]))  # max keeps the first of equals: model order
    if isinstance(model, nn.Sequential) and len(model) > 0:
        return "", list(model)
    if outer:  # a one-layer transformer
        return outer[0]
    raise ValueError(
        f"find_blocks: no list of repeated blocks found in {type(model).__name__}; "
        "pass path='...' naming the nn.ModuleList that holds its layers"
    )


def layer_keys(model: nn.Module, n_blocks: int) -> list:
    """Per-block layer type from config.layer_types when the blocks differ, else all None."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n_blocks and len(set(types)) > 1:
        return list(types)
    return [None] * n_blocks


# ---------------------------------------------------------------- capturing inputs

def default_forward_kwargs(model: nn.Module) -> dict:
    """use_cache=False where the forward takes it: a KV cache would grow across batches for nothing."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def call_model(model: nn.Module, batch, extra: dict | None = None, *, move: bool = True):
    """model(batch), model(**batch) or model(*batch) (plus `extra` keyword arguments),
    with the batch's tensors moved to the device of the model's weights (move=False:
    the caller already did, e.g. in a timed loop)."""
    extra = extra or {}
    p = next(model.parameters(), None) if move else None
    if p is not None:
        batch = to_device(batch, p.device)
    if isinstance(batch, torch.Tensor):
        return model(batch, **extra)
    if isinstance(batch, Mapping):
        return model(**{**batch, **extra})
    if isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    raise TypeError(f"calibration batch must be a tensor, a mapping of model arguments or a tuple, "
                    f"got {type(batch).__name__}")


def run_with_hooks(model: nn.Module, batches, handles: list, limit: int | None = None) -> None:
    """Run the model without gradients on (the first `limit` of) the batches, for the hooks
    behind `handles` to observe, then remove the hooks (also on an error)."""
    try:
        with torch.no_grad():
            for b in list(batches)[:limit]:
                call_model(model, b)
    finally:
        for h in handles:
            h.remove()


def to_device(batch, device: torch.device):
    """A batch (tensor, mapping or tuple of them) with its tensors on `device` (built on the CPU, say)."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _split(block_name: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    """Separate the hidden states from the other arguments of a block call."""
    if args:
        hidden, call = args[0], BlockCall(tuple(args[1:]), dict(kwargs))
    elif "hidden_states" in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        hidden, call = kwargs["hidden_states"], BlockCall((), rest, "hidden_states")
    else:
        raise ValueError(f"{block_name}: the model called it with no positional argument and no "
                         f"'hidden_states' keyword (keywords: {sorted(kwargs)}); cannot tell its input")
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"{block_name}: its first argument is a {type(hidden).__name__}, not a tensor")
    return hidden, call


def _capture(model: nn.Module, first: nn.Module, others: Mapping, batches: Iterable,
             forward_kwargs: dict | None) -> list[BlockInputs]:
    """Inputs of `first` for every batch, and the calls of the blocks in `others` (key -> block)."""
    extra = default_forward_kwargs(model) if forward_kwargs is None else dict(forward_kwargs)
    name = type(first).__name__
    out: list[BlockInputs] = []
    for batch in batches:
        seen: dict = {}
        by_type: dict = {}

        def on_first(_m, args, kwargs):
            seen["hidden"], seen["call"] = _split(name, args, kwargs)
            if not others:
                raise _StopForward

        def on_other(key):
            def hook(m, args, kwargs):
                by_type[key] = _split(type(m).__name__, args, kwargs)[1]
                if len(by_type) == len(others):
                    raise _StopForward
            return hook

        handles = [first.register_forward_pre_hook(on_first, with_kwargs=True)]
        handles += [b.register_forward_pre_hook(on_other(k), with_kwargs=True) for k, b in others.items()]
        try:
            call_model(model, batch, extra)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if "hidden" not in seen or len(by_type) < len(others):
            raise ValueError(f"capture_block_inputs: running {type(model).__name__} on a batch never called "
                             f"its block {name} (or the first block of every layer type); is it the "
                             "model's first block?")
        out.append(BlockInputs(seen["hidden"], seen["call"], by_type))
    if not out:
        raise ValueError("capture_block_inputs: no calibration batches")
    return out


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable, *,
                         forward_kwargs: dict | None = None) -> list[BlockInputs]:
    """Run the model on each batch up to `block` and record what it passes the block.

    batches: tensors (model(t)), mappings (model(**b)) or tuples (model(*b)).
    forward_kwargs: added to every call; default use_cache=False where the
    model's forward takes it. Runs under no_grad; the mode (train/eval) is the
    model's own — SequentialRunner sets eval.
    """
    with torch.no_grad():
        return _capture(model, block, {}, batches, forward_kwargs)


# ---------------------------------------------------------------- running block by block

def _hidden_of(block: nn.Module, out) -> torch.Tensor:
    """The hidden states out of a block: the tensor itself, or element 0 of a tuple / output object."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and out:  # transformers' ModelOutput is an OrderedDict
        out = next(iter(out.values()))
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{type(block).__name__} returned {type(out).__name__}; expected a tensor, "
                        "or a tuple / output object whose first element is the hidden states")
    return out


class _EvalMode:
    """Eval mode for the run, each module's own mode restored afterwards (dropout off while calibrating)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


class _SampleForward:
    """block -> its hidden states on the first calibration batch of the block being processed."""

    def __init__(self, call: BlockCall, hidden: torch.Tensor):
        self.call, self.hidden = call, hidden

    def __call__(self, block: nn.Module) -> torch.Tensor:
        return _hidden_of(block, self.call(block, self.hidden))


def input_hooks(targets, on_input) -> list:
    """Forward pre-hooks that pass each target's input to on_input(name, x); remove the
    returned handles when done."""
    def hook(name):
        def pre(_m, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            on_input(name, x)
        return pre

    return [t.module.register_forward_pre_hook(hook(t.name), with_kwargs=True) for t in targets]


class SequentialRunner:
    """Run calibration block by block; see the module docstring.

    targets: the modules whose inputs feed `on_input` and that `process_block`
        receives, grouped by block; default select_modules(model).targets.
        Targets outside the blocks (embeddings, an LM head, a pooler) are not
        processed here: they are listed in `self.unassigned`.
    blocks: (name, blocks) as find_blocks returns; default find_blocks(model).

    process_block changes the model it is given, in place; shrink.compress
    deep-copies the user's model before running this. Targets are the modules
    found at construction: after a run that replaced some, build a new runner.
    """

    def __init__(self, model: nn.Module, *, targets: Selection | Iterable[Target] | None = None,
                 blocks: tuple[str, Sequence[nn.Module]] | None = None,
                 forward_kwargs: dict | None = None):
        self.model = model
        self.path, self.blocks = blocks if blocks is not None else find_blocks(model)
        self.blocks = list(self.blocks)
        if targets is None:
            targets = select_modules(model)
        targets = list(targets.targets if isinstance(targets, Selection) else targets)
        names = {id(m): n for n, m in model.named_modules()}
        missing = [i for i, b in enumerate(self.blocks) if id(b) not in names]
        if missing:
            raise ValueError(f"SequentialRunner: blocks {missing} are not submodules of the model")
        self.block_names = [names[id(b)] for b in self.blocks]
        self.block_targets: list[list[Target]] = [[] for _ in self.blocks]
        self.unassigned: list[Target] = []
        for t in targets:
            i = next((i for i, bn in enumerate(self.block_names)
                      if t.name == bn or t.name.startswith(bn + ".")), None)
            (self.unassigned if i is None else self.block_targets[i]).append(t)
        self.keys = layer_keys(model, len(self.blocks))
        self.forward_kwargs = forward_kwargs
        # During process_block: block -> hidden states on the current block's first batch.
        self.sample_forward: _SampleForward | None = None

    def run(self, batches: Iterable, process_block: ProcessBlock | None = None, *,
            on_input: OnInput | None = None, progress: Progress | None = None, start: int = 0,
            after_block: Callable[[int], None] | None = None, inline: bool = False,
            replay: Callable[[nn.Module], AbstractContextManager] | None = None) -> list[torch.Tensor]:
        """Calibrate every block in order; returns the last block's outputs, one per batch.

        For block i: (a) with `on_input`, run the block on every batch with
        pre-hooks on its targets calling on_input(target_name, input); (b)
        process_block(i, block, targets) may change or replace modules in the
        block (it runs outside no_grad, in eval mode); (c) run the block as it
        now is to make block i+1's inputs. Without process_block the outputs of
        (a) are used and (c) is skipped.

        start: blocks before it are already processed (a resumed run): they only run (c),
        which gives block `start` the inputs an uninterrupted run gave it, bit for bit.
        after_block(i): called once block i is processed (e.g. to checkpoint the model).
        inline: on_input changes each target as pass (a) reaches it (it quantizes the layer
        on that input and makes this very call use the result), so the outputs of (a) are
        the processed block's: process_block then only finishes the block (installs
        modules) and (c) is skipped: one pass per block instead of two.
        replay(block): a context the blocks before `start` run (c) under, so that a resumed
        run reproduces the outputs an inline run computed (e.g. through its float path).
        """
        # By name, not the objects found at construction: an earlier run may have replaced blocks.
        blocks = [self.model.get_submodule(n) for n in self.block_names]
        first_key = self.keys[0]
        others = {}
        for k, b in zip(self.keys, blocks):
            if k != first_key and k not in others:
                others[k] = b
        with _EvalMode(self.model):
            with torch.no_grad():
                captured = _capture(self.model, blocks[0], others, batches, self.forward_kwargs)
            calls = [{first_key: c.call, **c.by_type} for c in captured]
            hidden = [c.hidden for c in captured]
            del captured  # `hidden` is now the only reference to block 0's inputs
            for i, block in enumerate(blocks):
                key, targets = self.keys[i], self.block_targets[i]
                if i < start:   # processed before an interruption: only its outputs are needed
                    with torch.no_grad(), (replay(block) if replay is not None else nullcontext()):
                        for b in range(len(hidden)):
                            hidden[b] = _hidden_of(block, calls[b][key](block, hidden[b]))
                    continue
                if on_input is not None:
                    # Without process_block these outputs are final; with it they are stale, so not kept.
                    self._observe(block, key, targets, hidden, calls, on_input,
                                  keep=process_block is None or inline)
                if process_block is not None:
                    # process_block may check an edit on the block's real input (surgery.fold does)
                    self.sample_forward = _SampleForward(calls[0][key], hidden[0])
                    process_block(i, block, list(targets))
                    self.sample_forward = None
                    # process_block may have replaced the block itself (a Sequential's Linear "block").
                    block = self.model.get_submodule(self.block_names[i])
                if on_input is None or (process_block is not None and not inline):
                    with torch.no_grad():
                        for b in range(len(hidden)):  # replace in place: inputs freed as outputs arrive
                            hidden[b] = _hidden_of(block, calls[b][key](block, hidden[b]))
                if after_block is not None and process_block is not None:
                    after_block(i)
                if progress is not None:
                    progress(i + 1, len(blocks))
        return hidden

    @staticmethod
    def _observe(block, key, targets, hidden, calls, on_input, keep: bool) -> None:
        """Run the block with on_input hooks on its targets; with keep, outputs replace `hidden` in place."""
        handles = input_hooks(targets, on_input)
        try:
            with torch.no_grad():
                for b, h in enumerate(hidden):
                    out = _hidden_of(block, calls[b][key](block, h))
                    if keep:
                        hidden[b] = out
        finally:
            for h in handles:
                h.remove()
