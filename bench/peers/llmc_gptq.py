"""llm-compressor's GPTQ on a saved HF model, for bench_peers_gptq.py.

Runs with the python of a separate venv that has llmcompressor (it pins its own
transformers / compressed-tensors): shrink is not imported here. Reads the
calibration and held-out token ids that bench_peers_gptq.py wrote, times
oneshot() (sequential pipeline, CPU), saves the compressed model, loads that
directory back, and scores it with the same KL code (peers/kl.py). Prints one
JSON line prefixed with RESULT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kl import mean_kl, reference_logprobs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="float HF directory")
    ap.add_argument("--tokens", required=True, help=".pt file: {'calibration': [n, seq], 'heldout': [m, seq]}")
    ap.add_argument("--out", required=True, help="directory for the compressed model")
    ap.add_argument("--actorder", default="none", choices=["none", "static", "group", "weight"])
    ap.add_argument("--symmetric", action="store_true", help="default asymmetric (as shrink's w4-gptq)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM
    import compressed_tensors
    import llmcompressor
    import transformers

    toks = torch.load(args.tokens)
    calib, heldout = toks["calibration"], toks["heldout"]
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib]
    loader = DataLoader(rows, batch_size=1, shuffle=False)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    load_s = time.perf_counter() - t0

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=args.symmetric,
                                 strategy="group", group_size=128,
                                 actorder=None if args.actorder == "none" else args.actorder),
    )
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                          dampening_frac=0.01, actorder=None if args.actorder == "none" else args.actorder)
    # The model has no tokenizer (ids are hashed words) and the data is already tokenized,
    # but oneshot insists on a processor when given a dataset: a word-level stand-in.
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                        unk_token="t0", pad_token="t0")
    t0 = time.perf_counter()
    oneshot(model=model, processor=processor, dataset=loader, recipe=recipe, pipeline="sequential",
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    oneshot_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    save_s = time.perf_counter() - t0
    del model
    nbytes = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))

    ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ref = reference_logprobs(ref_model, heldout)
    del ref_model
    qmodel = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    kl = mean_kl(qmodel, heldout, ref)
    print("RESULT " + json.dumps({
        "tool": f"llm-compressor {llmcompressor.__version__}", "oneshot_s": oneshot_s, "load_s": load_s,
        "save_s": save_s, "kl": kl, "safetensors_bytes": nbytes, "actorder": args.actorder,
        "symmetric": args.symmetric, "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "compressed_tensors": compressed_tensors.__version__},
        "loadavg": os.getloadavg(),
    }), flush=True)


if __name__ == "__main__":
    main()
