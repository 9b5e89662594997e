"""Dequantize llm-compressor's packed W4 output into float weights (run in llm-compressor's venv).

    ~/.cache/shrink/peers/llmc/bin/python bench/peers/llmc_dequant.py OUT_DIR weights.pt

Reads OUT_DIR/model.safetensors (pack-quantized int4, group scales, packed zero-points),
unpacks with compressed-tensors' own helper and writes {name.weight: (q - zp) * scale, plus
name.q / name.zp / name.scale} for block_errors.py.
"""
import sys, torch
from safetensors import safe_open
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
f = safe_open(sys.argv[1] + "/model.safetensors", "pt")
out = {}
for k in f.keys():
    if k.endswith("weight_packed"):
        base = k[: -len("weight_packed")]
        shape = torch.Size(f.get_tensor(base + "weight_shape").tolist())
        q = unpack_from_int32(f.get_tensor(k), 4, shape, 1).to(torch.int32)
        s = f.get_tensor(base + "weight_scale")
        zp = unpack_from_int32(f.get_tensor(base + "weight_zero_point"), 4, s.shape, 0).to(torch.int32)
        g = shape[1] // s.shape[1]
        w = (q - zp.repeat_interleave(g, 1)).float() * s.repeat_interleave(g, 1)
        out[base + "weight"] = w
        out[base + "q"] = q.to(torch.int8); out[base + "zp"] = zp.to(torch.int8); out[base + "scale"] = s
print(len(out), q.min().item(), q.max().item(), zp.min().item(), zp.max().item())
torch.save(out, sys.argv[2])
