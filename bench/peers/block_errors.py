"""Block by block, two quantized 374M Llamas against the float one, on the same inputs.

    SET=calibration|heldout .venv/bin/python bench/peers/block_errors.py shrink_weights.pt
    (llm-compressor's weights: $LLMC_WEIGHTS, default /tmp/kl/llmc_w.pt, written by llmc_dequant.py)

Three streams run through the 24 blocks: float, and each tool's quantized weights fed by
its own previous quantized blocks. Per block: the relative output error against the float
stream, and each layer group's GPTQ objective tr((W - Q) H (W - Q)^T) with H = 2 X^T X / n
from that stream's own inputs. Tells whether two tools differ in the solve (block 0, same
inputs) or in how errors compound, on calibration or held-out tokens.
"""
import copy
import os
import sys

import torch
from pathlib import Path
from transformers import LlamaForCausalLM
torch.manual_seed(0)
W = Path.home() / ".cache/shrink/peers/work"
toks = torch.load(W / "tokens-64x256-16.pt")
model = LlamaForCausalLM.from_pretrained(W / "llama374m-seed0-head6", dtype=torch.float32).eval()
streams = {"llmc": torch.load(os.environ.get("LLMC_WEIGHTS", "/tmp/kl/llmc_w.pt"))}
for p in sys.argv[1:]:
    streams[Path(p).stem] = torch.load(p)
cap = {}
def pre(m, args, kwargs):
    cap["x"] = args[0] if args else kwargs["hidden_states"]; cap["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    raise StopIteration
h = model.model.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
B = 16
SET = os.environ.get("SET", "calibration")
xs0, kw = [], None
with torch.no_grad():
    for i in range(0, toks[SET].shape[0], B):
        try: model.model(toks[SET][i:i+B])
        except StopIteration: pass
        xs0.append(cap["x"]); kw = cap["kw"]
h.remove()
kw = {k: v for k, v in kw.items() if k in ("position_embeddings", "attention_mask", "position_ids", "cache_position")}
print({k: (None if v is None else (tuple(v.shape) if torch.is_tensor(v) else type(v))) for k, v in kw.items()})
X = {"float": xs0}
for s in streams: X[s] = [x.clone() for x in xs0]
GROUPS = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o": ["self_attn.o_proj"],
          "gu": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}
tot = {s: {g: 0.0 for g in GROUPS} for s in streams}
with torch.no_grad():
    for k, layer in enumerate(model.model.layers):
        fl = [layer(x, **kw) for x in X["float"]]
        fl = [y[0] if isinstance(y, tuple) else y for y in fl]
        line = [f"block {k:2d}"]
        for s, wts in streams.items():
            q = copy.deepcopy(layer)
            for n, lin in q.named_modules():
                key = f"model.layers.{k}.{n}.weight"
                if key in wts: lin.weight.copy_(wts[key])
            Hs = {}
            hooks = []
            for g, mods in GROUPS.items():
                def f(m, a, g=g):
                    x = a[0].reshape(-1, a[0].shape[-1]).float()
                    Hs[g] = Hs.get(g, 0) + 2 * x.T @ x
                hooks.append(q.get_submodule(mods[0]).register_forward_pre_hook(f))
            ys = [q(x, **kw) for x in X[s]]
            ys = [y[0] if isinstance(y, tuple) else y for y in ys]
            for hk in hooks: hk.remove()
            n = toks[SET].numel()
            ls = []
            for g, mods in GROUPS.items():
                D = torch.cat([layer.get_submodule(m).weight - q.get_submodule(m).weight for m in mods])
                l = float(((D @ (Hs[g] / n)) * D).sum())
                tot[s][g] += l; ls.append(f"{g}={l:.3f}")
            err = sum(float(((a - b) ** 2).sum()) for a, b in zip(ys, fl)) / sum(float((b ** 2).sum()) for b in fl)
            line.append(f"{s}: rel_out_err {err:.4e} " + " ".join(ls))
            X[s] = ys
        X["float"] = fl
        print(" | ".join(line), flush=True)
for s in streams: print(s, {g: round(v, 3) for g, v in tot[s].items()})
