"""Carry shrink's integer codes into an exported ONNX graph, without rounding a second time.

torch.onnx exports the float model (`plain_copy`), whose quantized Linears hold their
dequantized weights. Each such weight is found in the graph by its values (the exporter
renames and transposes initializers, but never changes a float), and the node that
multiplies by it is rewritten to multiply by shrink's codes instead:

- codes of 5 to 8 bits -> an int8 (symmetric) or uint8 (with zero-point) initializer and a
  `DequantizeLinear` (per channel, or blocked along the inputs with `block_size`, opset 21)
  feeding the original MatMul / Gemm;
- codes of 2 to 4 bits -> `com.microsoft.MatMulNBits` with bits=4 and block_size the
  largest power of two (16 to 256) dividing the group (a group's scale repeated over its
  blocks): B as uint8 [N, K/block, block/2], two codes a byte, the first in the low nibble;
  scales float32 [N * K/block]; zero-points packed the same way, one row of blocks per
  output padded to whole bytes, or left out for symmetric codes (ONNX Runtime's default
  zero-point is 8, so the signed codes are stored shifted by 8). A `Gemm` (a Linear with a
  bias, on 2-D inputs) becomes MatMulNBits + Add: ONNX Runtime's own 4-bit quantizer skips
  Gemm without a word, this does not. Codes of fewer than 4 bits fit the 4-bit grid exactly.

A layer whose weight cannot be found, or whose codes fit neither form, stays in float and
is reported with the reason, never silently; `verify_onnx` then proves in ONNX Runtime that
the graph computes what shrink's dequantized model computes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from shrink.export.dense import Grid

MS_DOMAIN = "com.microsoft"
NBITS_BLOCKS = (256, 128, 64, 32, 16)   # MatMulNBits: a power of two, at least 16


@dataclass
class Carried:
    op: str            # "MatMulNBits" or "DequantizeLinear"
    bits: int          # of shrink's codes
    stored_bits: int   # of the container in the file (4 or 8)
    group_size: int
    symmetric: bool
    nodes: int         # graph nodes rewritten (a weight read twice counts twice)
    block_size: int | None = None   # MatMulNBits's / a blocked DequantizeLinear's block

    def as_dict(self) -> dict:
        return {"op": self.op, "bits": self.bits, "stored_bits": self.stored_bits, "group_size": self.group_size,
                "block_size": self.block_size, "symmetric": self.symmetric, "nodes": self.nodes}


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def nbits_block(grid: Grid, k: int) -> int | None:
    """MatMulNBits's block for a grid: the largest of 256, 128, 64, 32, 16 dividing its group
    (for one scale per row, the group is the row); each scale is repeated over the blocks of
    its group, so the block computes exactly what the group does."""
    group = min(grid.group_size, k)
    return next((b for b in NBITS_BLOCKS if group % b == 0), None)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 along the last axis (even length), two a byte, the first low."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def nbits_tensors(grid: Grid, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 [N, K/block, block/2], scales float32 [N * K/block], zero-points uint8
    [N * ceil(K/block / 2)] or None) for MatMulNBits(bits=4) holding `grid` exactly."""
    codes = grid.codes.numpy().astype(np.int64)
    n, k = codes.shape
    blocks = k // block
    scale = grid.scale.float().numpy().reshape(n, -1)
    if scale.shape[1] != blocks:   # a group spans several blocks: its scale is repeated over them
        scale = np.repeat(scale, blocks // scale.shape[1], axis=1)
    if grid.zero_point is None:
        q, zp = codes + 8, None    # ONNX Runtime's default zero-point for 4 bits is 8
    else:
        q = codes
        z = np.rint(grid.zero_point.float().numpy().reshape(n, -1)).astype(np.int64)
        if z.shape[1] != blocks:
            z = np.repeat(z, blocks // z.shape[1], axis=1)
        if blocks % 2:             # each row of zero-points is padded to whole bytes, with 8 as ORT does
            z = np.concatenate([z, np.full((n, 1), 8, np.int64)], axis=1)
        zp = pack_nibbles(z).reshape(-1)
    b = pack_nibbles(q.reshape(n, blocks, block))
    return b, np.ascontiguousarray(scale, dtype=np.float32).reshape(-1), zp


def _integer_zero_points(grid: Grid, hi: int) -> bool:
    z = grid.zero_point.float()
    return bool((z == z.round()).all()) and float(z.min()) >= 0 and float(z.max()) <= hi


def nbits_fits(grid: Grid, k: int) -> str | None:
    """Why `grid` cannot be MatMulNBits(bits=4) exactly (None: it can)."""
    if grid.bits > 4:
        return f"{grid.bits}-bit codes"
    if nbits_block(grid, k) is None:
        return f"group {min(grid.group_size, k)} is not a multiple of 16"
    shift = 8 if grid.zero_point is None else 0
    lo, hi = int(grid.codes.min()) + shift, int(grid.codes.max()) + shift
    if lo < 0 or hi > 15:
        return f"codes {lo - shift}..{hi - shift} do not fit 4 bits"
    if grid.zero_point is not None and not _integer_zero_points(grid, 15):
        return "zero-points are not integers in 0..15"
    return None


def dq_tensors(grid: Grid, transposed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int | None]:
    """(codes int8/uint8, scale float32, zero-point or None, axis, block_size or None) for a
    DequantizeLinear giving W [N, K] (transposed=False) or W.T [K, N] (transposed=True)."""
    codes = grid.codes.numpy()
    n, k = codes.shape
    per_channel = grid.group_size >= k
    scale = grid.scale.float().numpy().reshape(n, -1)
    if grid.zero_point is None:
        q = codes.astype(np.int8)
        zp = None
    else:
        q = codes.astype(np.uint8)
        zp = np.rint(grid.zero_point.float().numpy().reshape(n, -1)).astype(np.uint8)
    if per_channel:
        scale = scale[:, 0]
        zp = None if zp is None else zp[:, 0]
        return ((q.T if transposed else q), scale, zp, 1 if transposed else 0, None)
    if transposed:
        return q.T, scale.T, None if zp is None else zp.T, 0, grid.group_size
    return q, scale, zp, 1, grid.group_size


def dq_fits(grid: Grid) -> str | None:
    """Why `grid` cannot be an int8/uint8 DequantizeLinear exactly (None: it can)."""
    lo, hi = int(grid.codes.min()), int(grid.codes.max())
    if grid.zero_point is None:
        return None if -128 <= lo and hi <= 127 else f"codes {lo}..{hi} do not fit int8"
    if not _integer_zero_points(grid, 255):
        return "zero-points are not integers in 0..255"
    return None if lo >= 0 and hi <= 255 else f"codes {lo}..{hi} do not fit uint8"


def _attrs(helper, node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def find_uses(graph, helper, by_value: dict, w: np.ndarray) -> tuple[list[tuple], set[str]]:
    """[(node, transposed)]: the MatMul / Gemm nodes multiplying by `w` ([out, in]) — with B
    stored as w.T ([K, N], transposed=True) or as w; plus the float initializers holding
    `w` that something else reads too (they stay in the graph)."""
    def consumers(name: str):
        return [(node, i) for node in graph.node for i, x in enumerate(node.input) if x == name]

    uses, shared = [], set()
    for transposed in (True, False):
        init = by_value.get(_key(w.T if transposed else w))
        if init is None:
            continue
        for node, idx in consumers(init):
            if node.op_type == "MatMul" and idx == 1 and transposed:
                uses.append((node, True))
            elif node.op_type == "Gemm" and idx == 1 and not _attrs(helper, node).get("transA", 0) \
                    and _attrs(helper, node).get("transB", 0) == (0 if transposed else 1):
                uses.append((node, transposed))
            elif node.op_type == "Transpose" and not transposed \
                    and _attrs(helper, node).get("perm", [1, 0]) == [1, 0]:
                for nxt, j in consumers(node.output[0]):
                    if nxt.op_type == "MatMul" and j == 1:
                        uses.append((nxt, True))
                    else:
                        shared.add(init)
            else:
                shared.add(init)
    return uses, shared


def carry(model_proto, weights: dict, grids: dict[str, Grid], opset: int
          ) -> tuple[dict[str, dict], dict[str, str], list[str]]:
    """Rewrite `model_proto` in place so that each layer in `grids` multiplies by its codes.

    weights: {layer name: the float32 [out, in] weight the exported graph holds for it}.
    Returns ({layer: Carried.as_dict()}, {layer: why it stays in float}, [layers the graph
    does not contain: the exported outputs do not depend on them])."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    by_value: dict[tuple, str] = {}
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2:
            by_value.setdefault(_key(numpy_helper.to_array(t)), t.name)

    carried: dict[str, dict] = {}
    why_not: dict[str, str] = {}
    unused: list[str] = []
    swap: dict[str, list] = {}     # a node's first output -> the nodes that take its place
    # (protobuf hands out a new Python object at each access: nodes are known by their output)
    front: list = []               # DequantizeLinear nodes: they read initializers only
    new_inits: list = []
    for layer, grid in grids.items():
        w = weights[layer]
        n, k = w.shape
        if _key(w) not in by_value and _key(w.T) not in by_value:
            unused.append(layer)   # e.g. BERT's pooler when only last_hidden_state is exported
            continue
        uses, _ = find_uses(graph, helper, by_value, w)
        uses = [(node, t) for node, t in uses if node.output[0] not in swap]
        if not uses:
            why_not[layer] = "its weight is not the right operand of any MatMul or Gemm in the exported graph"
            continue
        reason = nbits_fits(grid, k)
        if reason is None and any(node.op_type == "Gemm" and not _plain_gemm(helper, node) for node, _ in uses):
            reason = "a Gemm with alpha or beta other than 1"
        if reason is None:
            block = nbits_block(grid, k)
            names = [f"{layer}.qweight", f"{layer}.scales", f"{layer}.qzeros"]
            for a, nm in zip(nbits_tensors(grid, block), names):
                if a is not None:
                    new_inits.append(numpy_helper.from_array(a, nm))
            names = names[:3 if grid.zero_point is not None else 2]
            for i, (node, _) in enumerate(uses):
                swap[node.output[0]] = _nbits_nodes(helper, node, f"{layer}.{i}" if i else layer, names, n, k, block)
            carried[layer] = Carried("MatMulNBits", grid.bits, 4, grid.group_size, grid.symmetric, len(uses),
                                     block).as_dict()
            continue
        dq_reason = dq_fits(grid)
        if dq_reason is not None:
            why_not[layer] = f"cannot be carried: {reason}; {dq_reason}"
            continue
        if grid.group_size < k and opset < 21:
            why_not[layer] = f"per-group DequantizeLinear needs opset 21 or newer (exporting opset {opset})"
            continue
        made: dict[bool, str] = {}
        for node, transposed in uses:
            if transposed not in made:
                q, s, zp, axis, block = dq_tensors(grid, transposed)
                tag = f"{layer}.{'wT' if transposed else 'w'}"
                names = [f"{tag}.qweight", f"{tag}.scales"] + ([f"{tag}.qzeros"] if zp is not None else [])
                new_inits += [numpy_helper.from_array(np.ascontiguousarray(a), nm)
                              for a, nm in zip((q, s, zp), names) if a is not None]
                attrs = {"axis": axis} if block is None else {"axis": axis, "block_size": block}
                front.append(helper.make_node("DequantizeLinear", names, [f"{tag}.dequantized"],
                                              name=f"{tag}.DequantizeLinear", **attrs))
                made[transposed] = f"{tag}.dequantized"
            new = helper.make_node(node.op_type, [node.input[0], made[transposed], *node.input[2:]],
                                   list(node.output), name=node.name)
            new.attribute.extend(node.attribute)
            swap[node.output[0]] = [new]
        carried[layer] = Carried("DequantizeLinear", grid.bits, 8, grid.group_size, grid.symmetric, len(uses),
                                 grid.group_size if grid.group_size < k else None).as_dict()
    if swap:
        nodes = list(front)
        for node in graph.node:
            nodes += swap.get(node.output[0], [node])
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(new_inits)
        _drop_unused(graph)
        ms = any(nd.domain == MS_DOMAIN for nd in graph.node)
        if ms and all(o.domain != MS_DOMAIN for o in model_proto.opset_import):
            model_proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return carried, why_not, unused


def _plain_gemm(helper, node) -> bool:
    a = _attrs(helper, node)
    return a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0


def _nbits_nodes(helper, node, tag: str, names: list[str], n: int, k: int, block: int) -> list:
    """MatMulNBits for a MatMul (A, B) or a Gemm (A, B[, C]); Gemm's bias becomes an Add."""
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    out = f"{node.output[0]}.matmul" if bias else node.output[0]
    mm = helper.make_node("MatMulNBits", [node.input[0], *names], [out], name=f"{tag}.MatMulNBits",
                          domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block)
    if not bias:
        return [mm]
    return [mm, helper.make_node("Add", [out, bias], [node.output[0]], name=f"{tag}.bias_add")]


def _drop_unused(graph) -> None:
    """Remove the float weights (and Transposes of them) that nothing reads any more."""
    inits = {t.name for t in graph.initializer}
    while True:
        read = {x for node in graph.node for x in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if node.op_type == "Transpose" and node.input[0] in inits
                and not any(o in read for o in node.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    keep = [t for t in graph.initializer if t.name in read]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
