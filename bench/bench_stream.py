"""Streaming quantization (issue 8): a Llama-shaped model whose fp32 weights exceed the
memory the process may use is quantized block by block under that limit, and the result
equals the in-memory run tensor for tensor.

1. Build the model on disk from a config, one block at a time (seeded random weights,
   one shard per block; never more than one block in memory).
2. In a child process whose data segment is capped with setrlimit(RLIMIT_DATA) below the
   weights' size, stream each recipe (recipe/stream.py). RLIMIT_DATA, not RLIMIT_AS:
   since Linux 4.7 RLIMIT_DATA counts private writable memory (heap, anonymous maps,
   copy-on-write file maps: everything the process owns), while the read-only shared
   memory maps of the shards (page cache the kernel can drop) and torch's reserved but
   unused address space do not count; RLIMIT_AS counts every mapping, so mapping a shard
   or torch's address reservations alone would trip it. A sampler thread records the peak
   VmData and VmRSS; ru_maxrss is the kernel's peak resident set.
3. Without a limit, the in-memory run (shrink.load + compress + save_compressed) and a
   tensor-by-tensor comparison.

    .venv/bin/python bench/bench_stream.py [--layers 16 --hidden 1536 --inter 4096] [--limit-gib G]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(d: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """config.json + one shard per block + embeddings/head shards + the index; one block in memory at a time."""
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
           "dtype": "float32"}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(0)
    hd = hidden // heads

    def w(o, i):
        return torch.randn(o, i, generator=g) / i ** 0.5

    def norm():
        return 1 + 0.1 * torch.randn(hidden, generator=g)

    pieces = [("embed", lambda: {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)})]
    for li in range(layers):
        p = f"model.layers.{li}."
        pieces.append((f"layer{li}", lambda p=p: {
            p + "self_attn.q_proj.weight": w(heads * hd, hidden), p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * hd),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter), p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm()}))
    pieces.append(("head", lambda: {"model.norm.weight": norm(), "lm_head.weight": w(vocab, hidden)}))
    n, weight_map, total = len(pieces), {}, 0
    for k, (_, make) in enumerate(pieces, 1):
        tensors = make()
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    return {"weights_bytes": total, "params": total // 4}


def batches(vocab: int, n: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (8, seq), generator=g)} for _ in range(n // 8)]


class Sampler(threading.Thread):
    """Peak VmData and VmRSS, read from /proc/self/status every few milliseconds."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"VmData": 0, "VmRSS": 0}
        self.stop = False

    def run(self):
        while not self.stop:
            for line in open("/proc/self/status"):
                k = line.split(":")[0]
                if k in self.peak:
                    self.peak[k] = max(self.peak[k], int(line.split()[1]) * 1024)
            time.sleep(0.005)


def child(args) -> None:
    if args.limit:
        resource.setrlimit(resource.RLIMIT_DATA, (args.limit, args.limit))   # before torch is imported
    sampler = Sampler()
    sampler.start()
    import torch

    from shrink.recipe.stream import stream_compress

    torch.set_num_threads(2)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    calib = batches(cfg["vocab_size"], args.samples, args.seq) if "gptq" in args.recipe else None
    t0 = time.perf_counter()
    stream_compress(args.model, args.recipe, args.out, calibration=calib, max_shard_bytes=args.shard)
    secs = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    print(json.dumps({"seconds": secs, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "peak_vmdata": sampler.peak["VmData"], "peak_vmrss": sampler.peak["VmRSS"]}))


def in_memory(model: str, recipe: str, out: Path, samples: int, seq: int) -> float:
    import shrink
    from shrink.models.compressed import save_compressed
    from shrink.recipe.run import compress

    cfg = json.loads((Path(model) / "config.json").read_text())
    t0 = time.perf_counter()
    m = shrink.load(model)
    calib = batches(cfg["vocab_size"], samples, seq) if "gptq" in recipe else None
    res = compress(m, recipe, calibration=calib, measure_speed=False)
    save_compressed(res.model, out, base={"kind": "hf"})
    return time.perf_counter() - t0


def compare(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors differing), one tensor at a time."""
    import torch

    from shrink.models.shards import ShardReader

    ra, rb = ShardReader(a), ShardReader(b)
    if sorted(ra.names()) != sorted(rb.names()):
        return len(ra.names()), -1
    return len(ra.names()), sum(not torch.equal(ra.get(n), rb.get(n)) for n in ra.names())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--recipe", action="append")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--shard", type=int, default=64 * 2**20)
    ap.add_argument("--limit-gib", type=float, default=None, help="RLIMIT_DATA (default: plan's streamed prediction)")
    ap.add_argument("--work", default="/tmp/shrink-bench-stream")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    if args.child:
        args.recipe = args.recipe[0]
        return child(args)
    import shutil

    from shrink.plan.jobmem import JobShape, job_memory
    from shrink.plan.arch import from_hf_config
    from shrink.recipe.steps import parse_recipe

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    model = work / "llama"
    t0 = time.perf_counter()
    info = build(model, args.layers, args.hidden, args.inter, args.heads, args.kv_heads, args.vocab)
    print(f"built {model}: {info['params']:,} params, fp32 weights {info['weights_bytes'] / 2**30:.2f} GiB "
          f"in {time.perf_counter() - t0:.0f} s")
    arch = from_hf_config(model)
    rows = []
    for recipe in args.recipe or ["w4-rtn", "w4-gptq"]:
        step = parse_recipe(recipe)[0]
        job = JobShape(spec=step.spec(), calibrated="gptq" in recipe, samples=args.samples, seq_len=args.seq,
                       shard_bytes=args.shard, label=recipe)
        d: dict = {}
        pred = job_memory(arch, job, d)
        limit = int(args.limit_gib * 2**30) if args.limit_gib else pred["streamed_bytes"]
        cmd = [sys.executable, __file__, "--child", "--model", str(model), "--out", str(work / f"s-{recipe}"),
               "--recipe", recipe, "--samples", str(args.samples), "--seq", str(args.seq), "--shard", str(args.shard),
               "--limit", str(limit)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if p.returncode != 0:
            print(p.stderr[-3000:])
            rows.append((recipe, limit, pred, None, None, None))
            continue
        got = json.loads(p.stdout.strip().splitlines()[-1])
        secs_mem = in_memory(str(model), recipe, work / f"m-{recipe}", args.samples, args.seq)
        n, diff = compare(work / f"s-{recipe}", work / f"m-{recipe}")
        rows.append((recipe, limit, pred, got, secs_mem, (n, diff)))
        print(d["job_memory[streamed]"])
        shutil.rmtree(work / f"m-{recipe}", ignore_errors=True)
    gib = 2**30
    print(f"\nfp32 weights: {info['weights_bytes'] / gib:.2f} GiB; calibration {args.samples} x {args.seq} tokens")
    print(f"{'recipe':<9} {'RLIMIT_DATA':>11} {'predicted':>10} {'peak VmData':>11} {'ru_maxrss':>10} "
          f"{'in-mem pred':>11} {'stream s':>8} {'in-mem s':>8} {'tensors equal':>14}")
    for recipe, limit, pred, got, secs_mem, cmp in rows:
        if got is None:
            print(f"{recipe:<9} {limit / gib:>9.2f}Gi  FAILED under the limit")
            continue
        n, diff = cmp
        print(f"{recipe:<9} {limit / gib:>9.2f}Gi {pred['streamed_bytes'] / gib:>8.2f}Gi "
              f"{got['peak_vmdata'] / gib:>9.2f}Gi {got['ru_maxrss'] / gib:>8.2f}Gi "
              f"{pred['in_memory_bytes'] / gib:>9.2f}Gi {got['seconds']:>8.1f} {secs_mem:>8.1f} "
              f"{'all ' + str(n) if diff == 0 else f'{diff} of {n} DIFFER':>14}")


if __name__ == "__main__":
    main()
