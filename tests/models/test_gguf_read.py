"""GGUF files read into shrink: llama and gpt2 models round-trip through files written the way
llama.cpp's convert_hf_to_gguf.py writes them; the tokenizer comes back; a truncated or
corrupt file is refused with a ValueError naming the file, never another exception."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from shrink.models.gguf_read import check_gguf, load_gguf, load_gguf_tokenizer  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "class Model:\n    pass  # a tiny model for a tiny test\n",
]
PROBES = ["def fox(a):\n    return a", "print('lazy dog')  # é 😀", "<|endoftext|>class X: pass"]
Q = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- fixtures: llama.cpp's conventions

@pytest.fixture(scope="module")
def tokenizer():
    from shrink.models.tiny_gpt import train_tokenizer

    return train_tokenizer(TEXTS * 4, vocab_size=300)


def _randomize(model, seed):
    """Weights far from init (norms too), so a misplaced or mis-permuted tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_scale = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_scale else 0.2 * noise)
    return model.eval()


def llama_model(vocab, tied, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                      tie_word_embeddings=tied)
    return _randomize(LlamaForCausalLM(cfg), seed)


def gpt2_model(vocab, tied, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=tied,
                     bos_token_id=0, eos_token_id=0)
    return _randomize(GPT2LMHeadModel(cfg), seed)


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (Q with n_head, K with n_head_kv heads)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_gpt2_vocab(w, tok, pre="gpt-2"):
    """As convert_hf_to_gguf.py's _set_vocab_gpt2: tokens by id, special tokens CONTROL, merges."""
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)


def write_gguf(path, model, tok=None, qtype=Q.F32, arch=None, tensors=None):
    cfg = model.config
    arch = arch or ("llama" if cfg.model_type == "llama" else "gpt2")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("shrink test model")
    if cfg.model_type == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    else:
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(int(qtype))
    if tok is not None:
        add_gpt2_vocab(w, tok)
    arch_enum = gguf.MODEL_ARCH.LLAMA if cfg.model_type == "llama" else gguf.MODEL_ARCH.GPT2
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    state = model.state_dict()
    if cfg.tie_word_embeddings:   # a tied lm_head is not in the HF checkpoint, so not in the GGUF
        state.pop("lm_head.weight", None)
    for hf_name, t in (tensors or state).items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or "rotary_emb" in hf_name:
            continue
        data = t.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        elif hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T
        data = np.ascontiguousarray(data)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if qtype == Q.F32 or data.ndim == 1:   # the converter keeps 1-D tensors in F32
            w.add_tensor(name, data)
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_dtype=None if qtype == Q.F16 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def roundtripped(model, qtype):
    """The model with every 2-D weight replaced by its dequantized GGUF encoding: what a reader must return."""
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                conv1d = name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))  # stored transposed
                data = np.ascontiguousarray(p.numpy().T if conv1d else p.numpy())
                back = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
                p.copy_(torch.from_numpy(back.T.copy() if conv1d else back))
    return ref


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_f32_round_trip_gives_the_same_logits(tmp_path, tokenizer, arch, tied):
    model = (llama_model if arch == "llama" else gpt2_model)(len(tokenizer), tied)
    path = write_gguf(tmp_path / f"{arch}.gguf", model, tokenizer)
    loaded = load_gguf(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config.tie_word_embeddings == tied
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    if arch == "llama":
        assert loaded.config.num_key_value_heads == 2 and loaded.config.rope_parameters["rope_theta"] == 500.0
    if not tied:
        assert loaded.lm_head.weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_quantized_round_trip_is_the_formats_own_error(tmp_path, tokenizer, arch, qtype):
    model = (llama_model if arch == "llama" else gpt2_model)(len(tokenizer), tied=False)
    path = write_gguf(tmp_path / f"{arch}.gguf", model, tokenizer, qtype=qtype)
    loaded = load_gguf(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ids = torch.randint(0, len(tokenizer), (1, 20), generator=torch.Generator().manual_seed(2))
    # exactly the dequantized encoding (so permutation and transposes commute with the blocks) ...
    torch.testing.assert_close(logits(loaded, ids), logits(roundtripped(model, qtype), ids), rtol=1e-4, atol=1e-4)
    # ... and close to the original, within what the format loses
    err = (loaded.get_input_embeddings().weight - model.get_input_embeddings().weight).abs().max().item()
    assert 0 < err < {Q.F16: 1e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.2}[qtype]


def test_tokenizer_round_trip(tmp_path, tokenizer):
    path = write_gguf(tmp_path / "t.gguf", gpt2_model(len(tokenizer), tied=True), tokenizer)
    tok = load_gguf_tokenizer(path)
    for text in TEXTS + PROBES:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tokenizer.eos_token_id
    assert len(tok) == len(tokenizer)


def spm_reference(text: str, pieces: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer, plainly: prefix a space, spaces to U+2581, merge the
    adjacent pair whose join is a token of highest score (leftmost on ties), bytes for the rest."""
    symbols = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = symbols[i] + symbols[i + 1]
            if joined in pieces and (best is None or scores[pieces[joined]] > best[0]):
                best = (scores[pieces[joined]], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for s in symbols:
        out += [pieces[s]] if s in pieces else [pieces[f"<0x{b:02X}>"] for b in s.encode()]
    return out


def test_sentencepiece_tokenizer_matches_llama_cpp(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    spec = json.loads(bpe.to_str())["model"]
    merged = {("".join(m) if isinstance(m, list) else m.replace(" ", "")): r for r, m in enumerate(spec["merges"])}
    learned = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    scores = [0.0] * 259 + [-float(merged.get(t, -1)) if t in merged else -1e4 for t in learned]
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_gguf_tokenizer(tmp_path / "spm.gguf")
    pieces = {t: i for i, t in enumerate(tokens)}
    for text in TEXTS + ["the lazy model jumps é 😀", "x  y"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == spm_reference(text, pieces, scores), text
        assert tok.decode(ids) == text
        assert tok.encode(text) == [1] + ids   # add_bos_token
    assert tok.bos_token == "<s>" and tok.unk_token == "<unk>"


# ----------------------------------------------------------------------------- corrupt files

@pytest.fixture(scope="module")
def valid(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    path = write_gguf(tmp_path_factory.mktemp("valid") / "m.gguf", model, tokenizer)
    reader = gguf.GGUFReader(str(path))    # landmarks from the reference reader, not from ours
    last = reader.tensors[-1].field
    infos_end = last.offset + sum(p.nbytes for p in last.parts)
    return path.read_bytes(), infos_end, reader


def flip_cases(data: bytes, regions, n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        corrupt = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            start, end = rng.choice(regions)
            corrupt[rng.randrange(start, end)] = rng.randrange(256)
        yield bytes(corrupt)


def load_everything(path):
    check_gguf(path)
    load_gguf(path)
    load_gguf_tokenizer(path)


def refused(path, data: bytes) -> str | None:
    """None if the file loads, else the ValueError's message; any other exception fails the test."""
    path.write_bytes(data)
    try:
        load_everything(path)
    except ValueError as e:
        assert str(path) in str(e), str(e)
        return str(e)
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(e).__name__} instead of ValueError: {e}")
    return None


def test_valid_file_loads(valid, tmp_path):
    data, _, _ = valid
    assert refused(tmp_path / "ok.gguf", data) is None


def test_truncation_anywhere_is_refused(valid, tmp_path):
    data, infos_end, _ = valid
    path = tmp_path / "cut.gguf"
    data_cuts = range(infos_end, len(data), max(1, (len(data) - infos_end) // 24))
    for cut in [*range(0, infos_end), *data_cuts, len(data) - 1]:
        msg = refused(path, data[:cut])
        assert msg is not None, f"a file cut at {cut} of {len(data)} bytes loaded"


def test_flipped_header_bytes_load_or_are_refused(valid, tmp_path):
    data, infos_end, reader = valid
    path = tmp_path / "flip.gguf"
    # anywhere before the data (mostly token text), then only the header, the hparams and the tensor table
    table = reader.tensors[0].field.offset
    hparams = reader.fields["tokenizer.ggml.model"].offset
    outcomes = [refused(path, c) for c in flip_cases(data, [(0, infos_end)], 100, seed=1234)]
    outcomes += [refused(path, c) for c in flip_cases(data, [(0, hparams), (table, infos_end)], 150, seed=99)]
    assert 10 < sum(o is not None for o in outcomes) < len(outcomes)   # some are refused, some still load


def _u64_at(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + value.to_bytes(8, "little") + data[at + 8:]


def test_specific_corruptions_name_the_field(valid, tmp_path):
    data, infos_end, reader = valid
    path = tmp_path / "bad.gguf"
    msg = refused(path, b"GGUX" + data[4:])
    assert "magic" in msg and "not a GGUF file" in msg
    for version in (1, 4):
        msg = refused(path, data[:4] + version.to_bytes(4, "little") + data[8:])
        assert "version" in msg and f"unsupported version {version}" in msg
    msg = refused(path, data[:4] + (3).to_bytes(4, "big") + data[8:])
    assert "big-endian" in msg
    # the last tensor's offset field is the last 8 bytes of the tensor table; its type the 4 before
    msg = refused(path, _u64_at(data, infos_end - 8, 1 << 20))
    assert "offset" in msg and f"byte offset {infos_end - 8}" in msg and "past the end of the file" in msg
    msg = refused(path, data[:infos_end - 12] + (99).to_bytes(4, "little") + data[infos_end - 8:])
    assert "unknown ggml type 99" in msg and reader.tensors[-1].name in msg
    msg = refused(path, _u64_at(data, 24, 1 << 60))   # the first metadata key's length
    assert "metadata key 0" in msg and "byte offset 24" in msg and "string length" in msg
    msg = refused(path, _u64_at(data, 16, 1 << 40))   # metadata count
    assert "cannot fit" in msg
    msg = refused(path, b"")
    assert "not a GGUF file" in msg


def test_unsupported_architecture_is_refused_before_any_work(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"general\.architecture.*'bert' is not supported.*llama or gpt2"):
        load_gguf(tmp_path / "bert.gguf")


def test_hparams_that_disagree_with_the_tensors_are_refused(tmp_path, tokenizer):
    model = llama_model(len(tokenizer), tied=True)
    model.config.num_hidden_layers = 3    # writes block_count 3 over 2 blocks of tensors
    path = write_gguf(tmp_path / "m.gguf", model, tokenizer, tensors=model.state_dict())
    with pytest.raises(ValueError, match=r"llama\.block_count.*declares 3 blocks"):
        load_gguf(path)


# ----------------------------------------------------------------------------- shrink.load and the CLI

@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, tokenizer):
    return write_gguf(tmp_path_factory.mktemp("cli") / "small.gguf", llama_model(len(tokenizer), tied=True), tokenizer)


def test_shrink_load_reads_gguf(small_llama):
    import shrink
    from shrink.models.io import load_tokenizer

    model = shrink.load(small_llama)
    assert model.config.model_type == "llama" and not model.training
    assert load_tokenizer(str(small_llama)).encode("def f", add_special_tokens=False)


def test_cli_eval_gguf(small_llama, tmp_path, capsys):
    from shrink.cli import main

    assert main(["eval", str(small_llama), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["quality"]["name"] == "perplexity" and doc["quality"]["value"] > 1
    assert doc["params"] == sum(p.numel() for p in load_gguf(small_llama).parameters())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(small_llama.read_bytes()[:1000])
    assert main(["eval", str(bad), "--json"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated" in err and "Traceback" not in err
