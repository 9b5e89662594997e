"""GPTQ W4 g128 on the 374M Llama of issue 9: shrink against llm-compressor.

    .venv/bin/python bench/bench_peers_gptq.py [--with-llmc] [--profile] [--device cuda] [--gptq KEY=VALUE ...]
        [--propagate kernel|fp32] [--trained STEPS]

--trained STEPS runs everything on the model briefly trained by
bench/train_llama374m.py (cached under --work; ~25 minutes to make once)
instead of the random-init one described below.

--device cuda runs shrink's GPTQ with the model on a GPU (no peer there).
--propagate fp32 installs each quantized layer with the dequantize-in-fp32
reference path while the later blocks are calibrated, instead of the int4
kernel (bf16 activations): it tells whether the kernel's rounding, carried
into the next blocks' inputs, costs KL.

The model is bench/llama374m.build(0) (random init) with its lm_head weight
multiplied by --head-scale (default 6): a random-init Llama predicts an almost
uniform next token (logit std 0.64, entropy 10.17 of at most 10.37 nats), so
every KL is ~0; scaling the unquantized head gives logits a realistic spread
(std ~3.8) without touching anything that is quantized. It is saved once as an
HF directory under --work and every tool loads that same directory.

Token ids: the model has no tokenizer, so text of the Python standard library
(shrink.data.corpus; calibration from the train split, scoring from the
held-out modules) is split into words and punctuation (regex \\w+|[^\\w\\s])
and each piece is hashed into the vocabulary (crc32 mod 32000): deterministic,
Zipf-like ids. 64 x 256 windows for calibration, 16 x 256 held out.

Score: mean over held-out tokens of KL(float || quantized) of the next-token
distributions (bench/peers/kl.py, the same code in both venvs).
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
import llama374m  # noqa: E402
from kl import mean_entropy, mean_kl, reference_logprobs  # noqa: E402

VOCAB = 32000
PEERS = Path.home() / ".cache" / "shrink" / "peers"
_WORD = re.compile(r"\w+|[^\w\s]")


def word_hash_ids(texts: list[str]) -> torch.Tensor:
    """One int64 stream: each word / punctuation mark -> crc32 mod VOCAB."""
    ids = [zlib.crc32(w.encode()) % VOCAB for t in texts for w in _WORD.findall(t)]
    return torch.tensor(ids, dtype=torch.int64)


def make_tokens(n_calib: int, n_heldout: int, seq: int) -> dict[str, torch.Tensor]:
    from shrink.data.calibration import calibration_texts, pack

    chars = 40 * seq * max(n_calib, n_heldout)  # ~4-5 chars a piece: plenty
    calib = pack(word_hash_ids(calibration_texts("stdlib", max_chars=chars)), n_calib, seq, seed=0)
    held = pack(word_hash_ids(calibration_texts("stdlib:heldout", max_chars=chars)), n_heldout, seq, seed=0)
    return {"calibration": calib, "heldout": held}


def ordered(calib: torch.Tensor, order: int) -> torch.Tensor:
    """The calibration sequences as drawn (order 0) or permuted with seed `order`."""
    if order == 0:
        return calib
    return calib[torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(order))]


def model_dir(work: Path, head_scale: float) -> Path:
    """The float model as an HF directory (built once; lm_head scaled)."""
    path = work / f"llama374m-seed0-head{head_scale:g}"
    if not (path / "config.json").is_file():
        model = llama374m.build(0)
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        tmp.rename(path)
    return path


def load_float(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def dequantized_copy(model):
    """The same model with every QuantLinear replaced by an fp32 nn.Linear of its dequantized
    weight: the algorithm's result without the int4 kernel's bf16 activations."""
    import copy

    from shrink.modules.quant_linear import QuantLinear

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  device=mod.codes.device)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight().float())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.float())
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, lin)
    return out


# ---------------------------------------------------------------- profile of shrink's run

# (label, how to find it in the profile: file suffix, function name)
_FUNCS = {
    "compress": ("recipe/run.py", "compress"),
    "deepcopy": ("/copy.py", "deepcopy"),
    "_gptq": ("recipe/run.py", "_gptq"),
    "capture": ("surgery/capture.py", "_capture"),
    "observe_pass": ("surgery/capture.py", "_observe"),
    "block_call": ("surgery/capture.py", "__call__"),
    "hessian_observe": ("observe/hessian.py", "observe"),
    "process_block": ("recipe/run.py", "process_block"),
    "share_input": ("recipe/run.py", "_share_input"),
    "hessian()": ("observe/hessian.py", "hessian"),
    "gptq_solve": ("algos/gptq.py", "gptq"),
    "inverse_cholesky": ("algos/gptq.py", "_inverse_cholesky"),
    "rows_split": ("recipe/run.py", "_rows"),
    "hessian_error": ("recipe/run.py", "_hessian_error"),
    "install": ("recipe/run.py", "_install"),
    "sqnr": ("recipe/run.py", "_sqnr"),
    "from_qtensor": ("modules/quant_linear.py", "from_qtensor"),
    "quantlinear_fwd": ("modules/quant_linear.py", "forward"),
    "quantize": ("quant/ops.py", "quantize"),
    "dequantize": ("quant/ops.py", "dequantize"),
    "rtn_outside": ("recipe/run.py", "_rtn_outside_blocks"),
    "onepass_hook": ("recipe/gptq_inline.py", "__call__"),
    "onepass_install": ("recipe/gptq_inline.py", "process_block"),
    "hessian_error_any": ("recipe/hessians.py", "hessian_error"),
    "split_rows": ("recipe/hessians.py", "split_rows"),
}


def _cum(stats: pstats.Stats, suffix: str, func: str) -> tuple[float, int]:
    total, calls = 0.0, 0
    for (file, _line, name), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
        if name == func and file.replace("\\", "/").endswith(suffix):
            total, calls = total + ct, calls + nc
    return total, calls


def _caller_cum(stats: pstats.Stats, suffix: str, func: str, caller_suffix: str, caller: str) -> float:
    """Cumulative time of func when called from caller (pstats keeps it per caller edge)."""
    for (file, _line, name), (_cc, _nc, _tt, _ct, callers) in stats.stats.items():
        if name == func and file.replace("\\", "/").endswith(suffix):
            return sum(v[3] for (cf, _cl, cn), v in callers.items()
                       if cn == caller and cf.replace("\\", "/").endswith(caller_suffix))
    return 0.0


def breakdown(stats: pstats.Stats) -> dict:
    c = {k: _cum(stats, *v) for k, v in _FUNCS.items()}
    s = {k: v[0] for k, v in c.items()}
    # quantize() called directly from _gptq's loop = the RTN quantize done only for error_rtn
    rtn_for_record = _caller_cum(stats, "quant/ops.py", "quantize", "recipe/run.py", "process_block")
    deq_in_records = _caller_cum(stats, "quant/ops.py", "dequantize", "recipe/run.py", "process_block")
    return {
        "total compress()": s["compress"],
        "deepcopy of the model": s["deepcopy"],
        "capture block-0 inputs (embeddings)": s["capture"],
        "block forward, calibration pass (without Hessian updates)": s["observe_pass"] - s["hessian_observe"],
        "Hessian accumulation (HessianObserver.observe)": s["hessian_observe"],
        "block forward, propagation pass (quantized block)": s["block_call"] - s["observe_pass"],
        "  of which QuantLinear.forward (both passes; only the second has any)": s["quantlinear_fwd"],
        "process_block total": s["process_block"],
        "  _share_input (torch.equal on Hessians)": s["share_input"],
        "  gptq() solve": s["gptq_solve"],
        "    of which _inverse_cholesky": s["inverse_cholesky"],
        "  _rows (split a jointly solved QTensor: dequantize + re-quantize + check)": s["rows_split"],
        "  _hessian_error (2 per layer, float64)": s["hessian_error"],
        "  RTN quantize for error_rtn (records only)": rtn_for_record,
        "  dequantize in the record lines (err, err_rtn)": deq_in_records,
        "  _install (QuantLinear.from_qtensor, SQNR record)": s["install"],
        "    of which from_qtensor (kernel repack)": s["from_qtensor"],
        "    of which _sqnr": s["sqnr"],
        "RTN outside the blocks": s["rtn_outside"],
        "one pass (true_sequential): block pass incl. hooks": s["observe_pass"],
        "  layer hooks (Hessian, solve, records)": s["onepass_hook"],
        "    of which Hessian accumulation": s["hessian_observe"],
        "    of which gptq() solve": s["gptq_solve"],
        "    of which hessian_error (records, 2 per layer)": s["hessian_error_any"],
        "    of which split_rows (a jointly solved QTensor per layer)": s["split_rows"],
        "  block end: install QuantLinear + records": s["onepass_install"],
        "calls": {k: v[1] for k, v in c.items()},
    }


# ---------------------------------------------------------------- runs

def run_shrink(path: Path, calib: torch.Tensor, heldout: torch.Tensor, ref, profile: bool,
               device: str = "cpu", propagate: str = "kernel", recipe="w4-gptq") -> dict:
    import shrink
    from shrink.modules.quant_linear import QuantLinear

    model = load_float(path).to(device)
    if propagate == "fp32":
        build = QuantLinear.from_qtensor.__func__
        QuantLinear.from_qtensor = classmethod(lambda cls, qt, bias=None, **kw: build(cls, qt, bias, kernel="reference"))
    batches = [row[None] for row in calib]
    load1 = os.getloadavg()
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    result = shrink.compress(model, recipe, calibration=batches, measure_speed=False)
    if prof:
        prof.disable()
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    load2 = os.getloadavg()
    if propagate == "fp32":
        QuantLinear.from_qtensor = classmethod(build)
    del model
    q = result.model
    kl_kernel = mean_kl(q, heldout, ref)
    kl_fp32 = mean_kl(dequantized_copy(q), heldout, ref)
    kernels = sorted({layer.kernel for s in result.steps for layer in s.layers})
    out = {"tool": f"shrink {shrink.__version__ if hasattr(shrink, '__version__') else ''}".strip(),
           "seconds": seconds, "kl": kl_kernel, "kl_fp32_dequantized": kl_fp32,
           "bytes": result.metrics["compressed"]["size_bytes"], "float_bytes": result.metrics["baseline"]["size_bytes"],
           "layers": sum(len(s.layers) for s in result.steps), "kernels": kernels,
           "loadavg_before": load1, "loadavg_after": load2, "profiled": profile, "device": device,
           "propagate": propagate, "recipe": recipe}
    if prof:
        out["breakdown"] = breakdown(pstats.Stats(prof))
    return out


def run_llmc(python: Path, path: Path, tokens_file: Path, out: Path, actorder: str, symmetric: bool) -> dict:
    cmd = [str(python), str(HERE / "peers" / "llmc_gptq.py"), "--model", str(path), "--tokens", str(tokens_file),
           "--out", str(out), "--actorder", actorder] + (["--symmetric"] if symmetric else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"llm-compressor runner failed (rc {proc.returncode}):\n{tail}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-llmc", action="store_true", help="also run llm-compressor (needs its venv)")
    ap.add_argument("--llmc-python", default=str(PEERS / "llmc" / "bin" / "python"))
    ap.add_argument("--llmc-actorder", default="none", help="none (as shrink's w4-gptq) or static (its default)")
    ap.add_argument("--llmc-symmetric", action="store_true")
    ap.add_argument("--skip-shrink", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile shrink's run and print where the time goes")
    ap.add_argument("--head-scale", type=float, default=6.0)
    ap.add_argument("--trained", type=int, metavar="STEPS",
                    help="use the model briefly trained by bench/train_llama374m.py for STEPS steps (trains it "
                         "first if it is not cached; --head-scale is then ignored)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--work", default=str(PEERS / "work"))
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--orders", type=int, nargs="+", default=[0],
                    help="calibration orders, one run of each tool per order: 0 = as drawn, N > 0 = the same "
                         "64 sequences permuted with seed N (mathematically the same calibration set; only "
                         "the floating-point summation order changes)")
    ap.add_argument("--device", default="cpu", help="where shrink's model runs (cpu, cuda)")
    ap.add_argument("--propagate", choices=("kernel", "fp32"), nargs="+", default=["kernel"],
                    help="how quantized layers run while later blocks calibrate (several: one run each)")
    ap.add_argument("--gptq", nargs="*", default=[], metavar="KEY=VALUE",
                    help="gptq step options over w4-gptq's, e.g. static_groups=true true_sequential=true")
    args = ap.parse_args()
    import yaml
    opts = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.gptq)}
    recipe = [{"gptq": opts}] if opts else "w4-gptq"

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.trained:
        from train_llama374m import train
        path = train(work, args.trained)
    else:
        path = model_dir(work, args.head_scale)
    toks = make_tokens(args.samples, args.heldout, args.seq)
    tokens_file = work / f"tokens-{args.samples}x{args.seq}-{args.heldout}.pt"
    torch.save(toks, tokens_file)

    ref_model = load_float(path).to(args.device)
    ref = reference_logprobs(ref_model, toks["heldout"])
    del ref_model
    which = f"trained {args.trained} steps" if args.trained else f"random init, lm_head x{args.head_scale:g}"
    print(f"# GPTQ W4 g128 asym, 374M Llama ({which}), {args.samples}x{args.seq} calibration "
          f"tokens, KL over {args.heldout}x{args.seq} held-out; {datetime.date.today()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")
    print(f"float model: mean next-token entropy {mean_entropy(ref):.3f} nats; "
          f"{sum(f.stat().st_size for f in path.glob('*.safetensors'))} safetensors bytes")

    rows = []
    for order in args.orders:
        calib = ordered(toks["calibration"], order)
        order_file = tokens_file if order == 0 else work / f"{tokens_file.stem}-order{order}.pt"
        if order != 0:
            torch.save({"calibration": calib, "heldout": toks["heldout"]}, order_file)
        tag = f" [calibration order {order}]" if len(args.orders) > 1 or order else ""
        if not args.skip_shrink:
            for how in args.propagate:
                r = run_shrink(path, calib, toks["heldout"], ref, args.profile, args.device, how, recipe)
                r["order"] = order
                rows.append(r)
                print(f"shrink {recipe} ({args.device}, propagate {how}){tag}: {r['seconds']:.1f} s, KL {r['kl']:.5f} "
                      f"(fp32 dequantized {r['kl_fp32_dequantized']:.5f}), {r['bytes']} bytes, kernels {r['kernels']}, "
                      f"load {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}", flush=True)
                if "breakdown" in r:
                    for k, v in r["breakdown"].items():
                        if k != "calls":
                            print(f"  {k}: {v:.1f} s")
        if args.with_llmc:
            out = work / f"llmc-out-{args.llmc_actorder}{'-sym' if args.llmc_symmetric else ''}-order{order}"
            r = run_llmc(Path(args.llmc_python), path, order_file, out, args.llmc_actorder, args.llmc_symmetric)
            r["order"] = order
            rows.append(r)
            print(f"{r['tool']}{tag}: oneshot {r['oneshot_s']:.1f} s, KL {r['kl']:.5f}, {r['safetensors_bytes']} "
                  f"safetensors bytes, actorder {r['actorder']}, load {r['loadavg'][0]:.2f}", flush=True)
    if len(args.orders) > 1:
        for tool in sorted({r["tool"] for r in rows}):
            kls = [r["kl"] for r in rows if r["tool"] == tool]
            print(f"{tool}: KL over {len(kls)} calibration orders: mean {sum(kls) / len(kls):.4f}, "
                  f"min {min(kls):.4f}, max {max(kls):.4f}", flush=True)
    del ref
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
