"""`tiny-gpt`: a small Llama-architecture causal LM trained by shrink on the
Python standard library's sources (DESIGN.md §6).

The recipe: a byte-level BPE tokenizer trained on the corpus's train split;
a `transformers.LlamaForCausalLM` from a seeded initialization; AdamW with
linear warm-up and cosine decay on random windows of the train split; the
held-out modules' perplexity measured at the end. Everything is seeded and run
with deterministic algorithms, so one machine gives the same bytes every time.

The result is cached (see `shrink.models.io`) in
``<cache>/models/tiny-gpt-<hash of the config>/``: the model and tokenizer as
written by `save_pretrained`, and ``training.json`` with the measurements.
"""
from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from shrink.data.calibration import token_stream
from shrink.data.corpus import stdlib_corpus
from shrink.fsutil import write_json_atomic
from shrink.models.io import build_cached, config_hash, deterministic, models_cache
from shrink.modules._buffers import eval_mode

# Bump when the training code changes in a way that changes the weights: it is part of the cache key.
TRAINING_VERSION = 1
END_OF_TEXT = "<|endoftext|>"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training.json")


@dataclass(frozen=True)
class TinyGPTConfig:
    # Measured on 2 shared cores at an equal budget of ~300 CPU-seconds: a narrow model
    # trained for more steps beats wider ones trained for fewer (held-out perplexity 57
    # at hidden 128 x 800 steps, 80-100 at hidden 192-256). 400 steps (perplexity ~92,
    # unigram ~700) keep the first training to a few minutes. Widths are multiples of
    # 128, so group-128 quantization divides every Linear's input dimension.
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    context: int = 256
    batch_size: int = 8
    steps: int = 400
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    max_train_chars: int | None = None      # cap on the train split (None: all of it)
    heldout_fraction: float = 0.05
    eval_tokens: int = 65536                # held-out tokens scored for perplexity
    precision: str = "fp32"                 # "fp32", "bf16" (autocast) or "auto": bf16 where the CPU has it

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "precision":
                if v not in ("auto", "fp32", "bf16"):
                    raise ValueError(f"TinyGPTConfig.precision must be 'auto', 'fp32' or 'bf16', got {v!r}")
            elif f.name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "heldout_fraction"):
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    raise ValueError(f"TinyGPTConfig.{f.name} must be a finite number >= 0, got {v!r}")
            elif f.name == "max_train_chars":
                if v is not None and (not isinstance(v, int) or v < 1):
                    raise ValueError(f"TinyGPTConfig.max_train_chars must be None or an int >= 1, got {v!r}")
            elif not isinstance(v, int) or v < (0 if f.name in ("seed", "warmup_steps") else 1):
                raise ValueError(f"TinyGPTConfig.{f.name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TinyGPTConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.vocab_size < 257:
            raise ValueError(f"TinyGPTConfig.vocab_size must be >= 257 (256 bytes + end of text), got {self.vocab_size}")

    def key(self) -> str:
        """Names the cache directory: the config, the training code's version, and
        the Python version (the corpus is that version's standard library)."""
        python = ".".join(platform.python_version_tuple()[:2])
        return config_hash({"config": asdict(self), "training_version": TRAINING_VERSION, "python": python})


@dataclass
class TrainedTinyGPT:
    model: torch.nn.Module
    tokenizer: object          # a transformers PreTrainedTokenizerFast
    record: dict               # what training.json holds


# ----------------------------------------------------------------------------- pieces

def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT, pad_token=END_OF_TEXT,
    )


def build_model(config: TinyGPTConfig, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.context,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def use_bf16(precision: str) -> bool:
    """bf16 autocast: ~1.6x faster training where the CPU has native bf16 (AVX-512 BF16,
    AMX), much slower where it would be emulated."""
    if precision != "auto":
        return precision == "bf16"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def lr_factor(step: int, config: TinyGPTConfig) -> float:
    """Linear warm-up to 1, then cosine down to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    t = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _windows(stream: torch.Tensor, seq_len: int, max_tokens: int | None) -> list[torch.Tensor]:
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return [stream[i:i + seq_len] for i in range(0, stream.numel(), seq_len) if stream[i:i + seq_len].numel() >= 2]


@torch.no_grad()
def stream_perplexity(model, stream: torch.Tensor, seq_len: int, max_tokens: int | None = None,
                      batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows of a token stream."""
    windows = _windows(stream, seq_len, max_tokens)
    if not windows:
        raise ValueError("perplexity needs at least 2 tokens of text")
    nll, count = 0.0, 0
    with eval_mode(model):   # a model already in eval mode is not touched: threads may share it
        full = [w for w in windows if w.numel() == seq_len]
        groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
        groups += [[w] for w in windows if w.numel() != seq_len]
        for group in groups:
            ids = torch.stack(group)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def perplexity(model, tokenizer, texts: Sequence[str], seq_len: int = 256, max_tokens: int | None = None) -> float:
    """Perplexity of a causal LM on texts (documents joined by end-of-text, scored in
    non-overlapping windows of `seq_len`, at most `max_tokens` tokens)."""
    if isinstance(texts, str):
        texts = [texts]
    return stream_perplexity(model, token_stream(tokenizer, texts), seq_len, max_tokens)


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of token frequencies from `train` (add-one smoothed) on `test`: the
    baseline a language model must beat by far."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[test].mean().item())


# ----------------------------------------------------------------------------- training

def train(config: TinyGPTConfig | None = None, progress: Callable[[int], None] | None = None) -> TrainedTinyGPT:
    """Train tiny-gpt in memory (no cache). `progress(step)` after each step, 1..config.steps."""
    config = config or TinyGPTConfig()
    start = time.perf_counter()
    # ~3.6 characters per token at vocab 4096; 8 per token leaves room for small vocabularies
    corpus = stdlib_corpus(max_train_chars=config.max_train_chars, max_heldout_chars=8 * config.eval_tokens,
                           heldout_fraction=config.heldout_fraction)
    train_texts, heldout_texts = corpus.train_texts, corpus.heldout_texts
    tokenizer = train_tokenizer(train_texts, config.vocab_size)
    tokenizer.model_max_length = config.context
    eos = tokenizer.eos_token_id
    train_ids = token_stream(tokenizer, train_texts)
    heldout_ids = token_stream(tokenizer, heldout_texts)
    if train_ids.numel() <= config.context + 1:
        raise ValueError(f"tiny-gpt: the train split has {train_ids.numel()} tokens, fewer than one context of {config.context}")
    data_seconds = time.perf_counter() - start

    losses = []
    bf16 = use_bf16(config.precision)
    with deterministic(config.seed):
        model = build_model(config, len(tokenizer), eos)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
        )
        g = torch.Generator().manual_seed(config.seed)
        offsets_high = train_ids.numel() - config.context
        model.train()
        train_start = time.perf_counter()
        for step in range(config.steps):
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_factor(step, config)
            offsets = torch.randint(0, offsets_high, (config.batch_size,), generator=g)
            batch = torch.stack([train_ids[o:o + config.context] for o in offsets.tolist()])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1)
        train_seconds = time.perf_counter() - train_start
        model.eval()
        eval_start = time.perf_counter()
        ppl = stream_perplexity(model, heldout_ids, config.context, config.eval_tokens)
        eval_seconds = time.perf_counter() - eval_start

    tail = losses[-max(1, min(20, len(losses))):]
    scored = heldout_ids[: config.eval_tokens]
    record = {
        "name": "tiny-gpt",
        "key": config.key(),
        "config": asdict(config),
        "training_version": TRAINING_VERSION,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": config.steps,
        "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32",
        "tokens_seen": config.steps * config.batch_size * config.context,
        "seconds": round(time.perf_counter() - start, 2),
        "seconds_data": round(data_seconds, 2),
        "seconds_train": round(train_seconds, 2),
        "seconds_eval": round(eval_seconds, 2),
        "first_train_loss": round(losses[0], 4),
        "final_train_loss": round(sum(tail) / len(tail), 4),
        "heldout_perplexity": round(ppl, 3),
        "heldout_tokens": int(scored.numel()),
        "unigram_perplexity": round(unigram_perplexity(train_ids, scored, len(tokenizer)), 3),
        "uniform_perplexity": len(tokenizer),
        "corpus": {
            "train_modules": len(corpus.train), "heldout_modules": len(corpus.heldout),
            "train_chars": sum(map(len, train_texts)), "heldout_chars": sum(map(len, heldout_texts)),
            "train_tokens": int(train_ids.numel()), "heldout_tokens": int(heldout_ids.numel()),
            "heldout": [d.module for d in corpus.heldout],
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    return TrainedTinyGPT(model=model, tokenizer=tokenizer, record=record)


def save(trained: TrainedTinyGPT, directory: str | Path) -> Path:
    """Model, tokenizer and training.json into `directory` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained.model.save_pretrained(str(directory))
    trained.tokenizer.save_pretrained(str(directory))
    write_json_atomic(directory / "training.json", trained.record)
    return directory


def tiny_gpt_dir(config: TinyGPTConfig | None = None, cache_dir: str | Path | None = None,
                 progress: Callable[[int], None] | None = None) -> Path:
    """The cached model directory, trained first if it is not there yet."""
    config = config or TinyGPTConfig()
    final = models_cache(cache_dir) / f"tiny-gpt-{config.key()}"
    return build_cached(final, REQUIRED_FILES, lambda tmp: save(train(config, progress), tmp))


def load_tiny_gpt(config: TinyGPTConfig | None = None, cache_dir: str | Path | None = None,
                  progress: Callable[[int], None] | None = None):
    """(model in eval mode, tokenizer), from the cache (trained on first use)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    directory = tiny_gpt_dir(config, cache_dir, progress)
    model = LlamaForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model, tokenizer
