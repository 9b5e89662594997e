"""The recommendation follows the seeds' decision trees.

Seed 001, ch. 9 ("The Compression Decision Tree"): no training budget -> PTQ: INT8 if it
fits, else GPTQ/AWQ INT4 (cheat sheet: AWQ 0.5-2%, GPTQ 1-3%); training compute -> QAT
(0.5-1% better than PTQ); more than ~10x compression -> distill to a smaller architecture
first, then quantize. Seed 004 (decision tree by platform): server "quantize if possible",
edge "INT4 or prune", mobile "distill + quantize", MCU "extreme compression".

Each case also checks the premise the rule rests on (what fits) from the plan itself, and
that the reasons quote the chosen format's own total.
"""
from __future__ import annotations

import math
import re

import pytest

from shrink.plan.numbers import format_bytes

import shrink
from shrink.plan import custom_device

# (id, model, plan kwargs, expected format, expected recipe, formats that must fit, must not fit)
CASES = [
    ("int8-fits", "llama-2-7b", dict(device="rtx-4090", context=4096),
     "int8", "int8", {"int8", "fp16"}, set()),
    ("fp16-no-budget", "llama-2-7b", dict(device="rtx-4090", context=4096, max_drop=0.05),
     "fp16", "none", {"fp16"}, set()),
    ("max-drop-0.1-is-enough-for-int8", "llama-2-7b", dict(device="rtx-4090", context=4096, max_drop=0.1),
     "int8", "int8", {"fp16", "int8"}, set()),
    ("fp16-too-big-for-strict-budget", "llama-2-13b", dict(device="rtx-4090", context=8192, max_drop=0.05),
     "int8", "int8", {"int8"}, {"fp16"}),
    ("int4-awq-t4", "llama-2-13b", dict(device="t4", context=4096),
     "int4-g128", "w4-awq", {"int4-g128"}, {"int8", "fp8-e4m3"}),
    ("int4-awq-4090-long-context", "llama-2-13b", dict(device="rtx-4090", context=16384),
     "int4-g128", "w4-awq", {"int4-g128"}, {"int8"}),
    ("int4-awq-just-under-2", "llama-2-13b", dict(device="t4", context=4096, max_drop=1.99),
     "int4-g128", "w4-awq", {"int4-g128"}, {"int8"}),
    ("int4-gptq-at-2", "llama-2-13b", dict(device="t4", context=4096, max_drop=2),
     "int4-g128", "w4-gptq", {"int4-g128"}, {"int8"}),
    ("int4-gptq-loose", "llama-2-13b", dict(device="t4", context=4096, max_drop=5),
     "int4-g128", "w4-gptq", {"int4-g128"}, {"int8"}),
    ("qat-tight-budget", "llama-2-13b", dict(device="t4", context=4096, max_drop=0.5, can_train=True),
     "int4-g128", "qat-int4", {"int4-g128"}, {"int8"}),
    ("train-but-budget-1-is-not-tight", "llama-2-13b", dict(device="t4", context=4096, max_drop=1.0,
                                                            can_train=True),
     "int4-g128", "w4-awq", {"int4-g128"}, {"int8"}),
    # seed 001, ch. 9: "70B on a single 80GB A100 ... KV cache needs ~25 GB": 19 x 4K contexts
    ("70b-a100-25gb-kv", "llama-2-70b", dict(device="a100-80gb", context=4096, batch=19),
     "int4-g128", "w4-awq", {"int4-g128"}, {"int8"}),
    ("edge-pi5", "llama-2-7b", dict(device="raspberry-pi-5", context=4096),
     "int4-g128", "w4-awq", {"int4-g128"}, {"int8"}),
    ("compute-bound-int8-w8a8", "gpt2", dict(device="raspberry-pi-5", context=16, batch=64),
     "int8", "w8a8-smoothquant", {"int8"}, set()),
    ("70b-on-a-phone", "llama-2-70b", dict(device="phone"),
     "int4-g128", "distill+w4", set(), {"int4-g128", "nf4-g64", "int3-g128", "int2-g64"}),
    ("70b-on-a-phone-can-train", "llama-2-70b", dict(device="phone", can_train=True),
     "int4-g128", "distill+w4", set(), {"int4-g128", "int2-g64"}),
    ("mcu", "minilm", dict(device="microcontroller"),
     "int8", "prune+distill+int8", set(), {"int8", "int2-g64"}),
    ("mcu-tier", "minilm", dict(device="mcu", context=8),
     "int8", "prune+distill+int8", set(), {"int8"}),
]


@pytest.fixture(scope="module")
def planned():
    return {c[0]: shrink.plan(c[1], **c[2]) for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decision_tree(planned, case):
    cid, _, _, fmt, recipe, must_fit, must_not = case
    p = planned[cid]
    for name in must_fit:
        assert p.format(name).fits is True, (cid, name)
    for name in must_not:
        assert p.format(name).fits is False, (cid, name)
    rec = p.recommendation
    assert (rec["format"], rec["recipe"]) == (fmt, recipe)
    assert set(rec) == {"format", "recipe", "why"}
    assert rec["why"] and all(isinstance(w, str) and w for w in rec["why"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_why_quotes_the_chosen_formats_numbers(planned, case):
    p = planned[case[0]]
    why = " ".join(p.recommendation["why"])
    assert re.search(r"\d", why)
    chosen = p.format(p.recommendation["format"])
    assert format_bytes(chosen.total_bytes) in why  # the figure the decision rests on


def test_why_names_what_did_not_fit_and_the_tier(planned):
    why = planned["int4-awq-t4"].recommendation["why"]
    int8 = planned["int4-awq-t4"].format("int8").total_bytes
    assert any("int8 does not fit" in w and format_bytes(int8) in w for w in why)
    assert any("server tier" in w for w in why)
    assert any("edge tier" in w for w in planned["edge-pi5"].recommendation["why"])
    assert any("mobile tier" in w for w in planned["70b-on-a-phone"].recommendation["why"])
    assert any("microcontroller tier" in w for w in planned["mcu"].recommendation["why"])
    assert any("compute-bound" in w for w in planned["compute-bound-int8-w8a8"].recommendation["why"])
    assert planned["compute-bound-int8-w8a8"].format("int8").bound == "compute"
    assert any("fp16 fits too" in w for w in planned["int8-fits"].recommendation["why"])


def test_distillation_student_size_and_training_note(planned):
    """70B on a phone needs >10x (seed 001: distill first). The student estimate is the room
    left beside the KV cache and activations at int4-g128's bytes per parameter."""
    p = planned["70b-on-a-phone"]
    f = p.format("int4-g128")
    student = int((p.usable_bytes - (f.total_bytes - f.weight_bytes)) / (f.weight_bytes / p.model.params))
    why = p.recommendation["why"]
    assert any(f"~{student / 1e6:,.0f}M parameters" in w for w in why)
    assert any(f"{p.format('fp16').total_bytes / p.usable_bytes:.1f}x compression" in w for w in why)
    assert p.format("fp16").total_bytes / p.usable_bytes > 10
    assert any("needs training compute" in w for w in why)
    assert not any("needs training compute" in w for w in planned["70b-on-a-phone-can-train"].recommendation["why"])


def _low_bit_plan(can_train: bool):
    """Llama-2-7B on a custom device with room for int3-g128 but not for int4-g128."""
    free = shrink.plan("llama-2-7b", context=512)
    lo, hi = free.format("int3-g128").total_bytes, free.format("int4-g128").total_bytes
    mem = math.ceil((lo + hi) / 2 / 0.9)
    return shrink.plan("llama-2-7b", context=512, memory=mem, bandwidth="100GB/s", can_train=can_train)


def test_below_four_bits_without_training_is_w3_gptq():
    p = _low_bit_plan(can_train=False)
    assert p.format("int3-g128").fits and not p.format("int4-g128").fits and not p.format("nf4-g64").fits
    assert p.recommendation["format"] == "int3-g128" and p.recommendation["recipe"] == "w3-gptq"
    assert any("no 4-bit format fits" in w for w in p.recommendation["why"])


def test_below_four_bits_with_training_distills_instead():
    p = _low_bit_plan(can_train=True)
    assert p.format("int3-g128").fits and not p.format("int4-g128").fits
    assert p.recommendation["recipe"] == "distill+w4"


def test_no_memory_no_recommendation():
    assert shrink.plan("llama-2-7b").recommendation is None
    assert shrink.plan("llama-2-7b", bandwidth="1TB/s").recommendation is None


@pytest.mark.parametrize("bad", [0, -1, 100.5, 200])
def test_max_drop_outside_0_100_is_rejected(bad):
    with pytest.raises(ValueError, match="max-drop"):
        shrink.plan("llama-2-7b", device="rtx-4090", max_drop=bad)


def test_max_drop_100_is_allowed():
    assert shrink.plan("llama-2-13b", device="t4", max_drop=100).recommendation["recipe"] == "w4-gptq"


def test_restricted_formats_still_recommend_among_them():
    p = shrink.plan("llama-2-13b", device="t4", context=4096, formats=["nf4-g64", "int8"])
    assert p.recommendation["format"] == "nf4-g64" and p.recommendation["recipe"] == "w4-awq"



def test_why_does_not_claim_an_unplanned_format_does_not_fit():
    p = shrink.plan("llama-2-7b", device="rtx-4090", context=4096, formats=["int4-g128", "fp16"])
    assert shrink.plan("llama-2-7b", device="rtx-4090", context=4096).format("int8").fits
    assert not any("int8 does not fit" in w for w in p.recommendation["why"])



def test_why_never_prints_nan_when_fp16_is_not_listed():
    p = shrink.plan("llama-2-70b", device="phone", formats=["int4-g128"])
    assert p.recommendation["recipe"] == "distill+w4"
    assert not any("nan" in w for w in p.recommendation["why"])



def test_why_on_a_microcontroller_shows_its_memory():
    p = shrink.plan("minilm", device="microcontroller")
    assert not any("0.00 GB" in w for w in p.recommendation["why"])


def test_custom_device_has_no_tier_line_but_still_decides():
    p = shrink.plan("llama-2-7b", device=custom_device(memory="24GiB", bandwidth="1TB/s"), context=4096)
    rec = p.recommendation
    assert rec["format"] == "int8" and not any("tier" in w for w in rec["why"])
