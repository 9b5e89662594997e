"""Rows of a jointly solved QTensor (recipe/hessians.split_rows): the codes and scales of
those rows, as quantizing the rows alone with the same scales gives."""
import pytest
import torch

from shrink.quant import QuantSpec, dequantize, quantize
from shrink.recipe.hessians import split_rows


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16, axis=0),
    QuantSpec(bits=3, symmetric=True, granularity="group", group_size=12, axis=0),   # ragged groups, 3-bit packing
    QuantSpec(bits=8, symmetric=True, granularity="channel", axis=0),
    QuantSpec(bits=2, symmetric=False, granularity="channel", axis=0),
])
@pytest.mark.parametrize("start,stop", [(0, 7), (7, 20), (3, 4), (0, 37)])
def test_split_rows_is_the_rows_quantized_alone(spec, start, stop):
    g = torch.Generator().manual_seed(start * 100 + stop)
    w = torch.randn(37, 40, generator=g)
    qt = quantize(w, spec)
    part = split_rows(qt, start, stop, spec)
    ref = quantize(dequantize(qt)[start:stop], spec, scale=qt.scale[start:stop],
                   zero_point=None if qt.zero_point is None else qt.zero_point[start:stop])
    assert part.shape == (stop - start, 40)
    assert torch.equal(part.int_codes(), qt.int_codes()[start:stop])
    assert torch.equal(part.data, ref.data)
    assert torch.equal(dequantize(part), dequantize(qt)[start:stop])
    assert part.nbytes == ref.nbytes
