"""shrink's GPTQ of the 374M Llama, saved as dequantized float weights for block_errors.py.

    REVERSE=1 (optional: calibration sequences in reverse order)
    .venv/bin/python bench/peers/shrink_dequant.py weights.pt static_groups=true [true_sequential=true]

Uses the tokens and model directory bench_peers_gptq.py left in ~/.cache/shrink/peers/work.
"""
import sys, torch, time

from pathlib import Path
from transformers import LlamaForCausalLM
import shrink
from shrink.modules.quant_linear import QuantLinear
W = Path.home() / ".cache/shrink/peers/work"
toks = torch.load(W / "tokens-64x256-16.pt")
m = LlamaForCausalLM.from_pretrained(W / "llama374m-seed0-head6", dtype=torch.float32).eval()
opts = dict(a.split("=") for a in sys.argv[2:])
import yaml, os
opts = {k: yaml.safe_load(v) for k, v in opts.items()}
t = time.time()
res = shrink.compress(m, [{"gptq": opts}], calibration=[r[None] for r in (toks["calibration"].flip(0) if os.environ.get("REVERSE") else toks["calibration"])], measure_speed=False)
print("seconds", time.time() - t, flush=True)
out = {}
for name, mod in res.model.named_modules():
    if isinstance(mod, QuantLinear):
        out[name + ".weight"] = mod.dequantized_weight().float()
torch.save(out, sys.argv[1])
print(len(out))
