"""One compressed model shared by 8 threads gives, call for call, the bytes a serial run gives.

Each model is compressed, saved as `shrink compress` saves it and loaded back
(shrink.load), then 8 threads released together by a barrier run every input
several times in their own order; every output must be bit-identical to the serial
output for that input. Covered: int4 per group (the int4pack fast path), int8
(int8pack), kmeans (codebook, reference path), unstructured sparsity in CSR and
bitmask storage, W8A8 with SmoothQuant, a conv net in int8 (QuantConv2d) and pruned
(SparseConv2d), QLoRA kept apart (nf4 base + adapters, and merged), early exit at a
threshold (rows leave at different exits) with a recorder open in one thread.

The harness itself is tested: a module that keeps per-call state on itself (the
bug this file guards against) is caught.
"""
from __future__ import annotations

import random
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import shrink
from shrink.models.compressed import save_compressed
from shrink.modules import EarlyExitModel, LoRALinear, QuantConv2d, QuantLinear, SparseConv2d, SparseLinear, W8A8Linear
from shrink.recipe import compress
from tests_support import tiny_llama

THREADS = 8


def hammer(fn, inputs, rounds: int = 3, threads: int = THREADS) -> list[str]:
    """Run fn on every input serially, then from `threads` threads at once (`rounds` passes
    each, shuffled per thread); return a line per output that differs from the serial one."""
    with torch.inference_mode():
        ref = [fn(x) for x in inputs]
    bad: list[str] = []
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        order = [i for _ in range(rounds) for i in range(len(inputs))]
        random.Random(t).shuffle(order)
        start.wait()
        with torch.inference_mode():
            for i in order:
                y = fn(inputs[i])
                if not torch.equal(y, ref[i]):
                    bad.append(f"thread {t}, input {i}: max diff {float((y.float() - ref[i].float()).abs().max())}")

    errors: list[BaseException] = []

    def run(t):
        try:
            worker(t)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if errors:
        raise errors[0]
    return bad


def saved_and_loaded(model, tmp_path, name, builtin=None):
    base = {"kind": "hf"} if builtin is None else {"kind": "builtin", "name": builtin}
    return shrink.load(str(save_compressed(model, tmp_path / name, base=base))).eval()


def _ids(n=6, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 5), (2, 9), (3, 4), (1, 16), (2, 12), (4, 7)][:n]
    return [torch.randint(0, vocab, s, generator=g) for s in shapes]


def _logits(model):
    return lambda ids: model(input_ids=ids).logits


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2).eval()


def _calib():
    return [{"input_ids": x} for x in _ids(4, seed=7)]


@pytest.mark.parametrize("recipe,module,kernel", [
    ("w4-rtn", QuantLinear, "int4pack_cpu"),
    ("int8", QuantLinear, "int8pack_cpu"),
    ("kmeans16", QuantLinear, "reference"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.9, "storage": "csr"}}], SparseLinear, "csr_cpu"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5, "storage": "bitmask"}}], SparseLinear, "dense_rebuild"),
    ("w8a8-smoothquant", W8A8Linear, "int_mm"),
], ids=["int4-g128", "int8", "kmeans", "csr", "bitmask", "w8a8"])
def test_a_shared_compressed_llm_gives_serial_bytes(llama, tmp_path, recipe, module, kernel):
    res = compress(llama, recipe, calibration=_calib(), measure_speed=False)
    model = saved_and_loaded(res.model, tmp_path, "llm")
    mods = [m for m in model.modules() if isinstance(m, module)]
    assert mods and any(m.kernel == kernel for m in mods), [m.kernel for m in mods]
    assert hammer(_logits(model), _ids()) == []


def test_sparse_csr_first_calls_from_threads_leave_the_warning_filters_alone(llama, tmp_path):
    import shrink.modules.sparse_linear as sl

    res = compress(llama, [{"prune": {"method": "magnitude", "sparsity": 0.9, "storage": "csr"}}],
                   measure_speed=False)
    model = saved_and_loaded(res.model, tmp_path, "csr")
    filters = list(warnings.filters)
    sl._csr_warned = False   # the first call of the process silences torch's beta warning
    assert hammer(_logits(model), _ids(3), rounds=1) == []
    assert warnings.filters == filters


@pytest.fixture(scope="module")
def qlora(llama):
    return compress(llama, [{"lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"],
                                      "base_bits": 4, "base_format": "nf4", "merge": False, "steps": 3,
                                      "lr": 1e-2}}], calibration=_calib(), measure_speed=False).model


def test_a_shared_qlora_model_gives_serial_bytes_unmerged_and_merged(qlora, tmp_path):
    model = saved_and_loaded(qlora, tmp_path, "qlora")
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert loras and all(isinstance(m.base, QuantLinear) and not m.merged for m in loras)
    assert float(loras[0].lora_B.detach().abs().max()) > 0   # trained: the adapters change the output
    assert hammer(_logits(model), _ids()) == []
    for m in loras:
        m.merge()
    assert hammer(_logits(model), _ids()) == []


@pytest.fixture(scope="module")
def digits():
    from shrink.data.labeled import labeled_batches
    from shrink.models.digits import digits_data

    d = digits_data()
    return d, labeled_batches(d.x_train[:320], d.y_train[:320])


def _image_batches(d):
    x = d.x_test
    return [x[:1], x[1:2], x[2:9], x[9:40], x[40:41], x[41:120]]


@pytest.fixture(scope="module")
def early_exit(digits, tmp_path_factory):
    d, train = digits
    res = compress(shrink.load("digits-mlp"), [{"early_exit": {"steps": 30, "threshold": 0.8}}], train_data=train,
                   calibration=[d.x_train[:64]], measure_speed=False)
    return saved_and_loaded(res.model, tmp_path_factory.mktemp("ee"), "ee", "digits-mlp")


def test_a_shared_early_exit_model_gives_serial_bytes(early_exit, digits):
    d, _ = digits
    model, inputs = early_exit, _image_batches(d)
    assert isinstance(model, EarlyExitModel) and model.threshold == 0.8
    with model.recording() as st, torch.no_grad():
        for x in inputs:
            model(x)
    assert sum(1 for c in st.counts if c) >= 2, st.counts   # rows leave at different exits
    assert hammer(model, inputs, rounds=4) == []


def test_a_recorder_counts_its_own_threads_calls_only(early_exit, digits):
    d, _ = digits
    model, inputs = early_exit, _image_batches(d)
    with model.recording() as alone, torch.no_grad():
        for x in inputs:
            model(x)
    stop = threading.Event()

    def noise():
        with torch.no_grad():
            while not stop.is_set():
                model(inputs[3])

    others = [threading.Thread(target=noise) for _ in range(3)]
    for t in others:
        t.start()
    try:
        time.sleep(0.05)
        with model.recording() as busy, torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        stop.set()
        for t in others:
            t.join()
    assert (busy.counts, busy.calls) == (alone.counts, alone.calls)
    assert model._recorders == {}


def test_a_shared_conv_net_gives_serial_bytes(digits, tmp_path):
    d, train = digits
    x = d.x_test
    inputs = [x[:1], x[1:5], x[5:37]]
    for recipe, module in (("int8", QuantConv2d),
                           ([{"prune": {"method": "magnitude", "sparsity": 0.5}}], SparseConv2d)):
        res = compress(shrink.load("digits-cnn"), recipe, calibration=[d.x_train[:32]], measure_speed=False)
        model = saved_and_loaded(res.model, tmp_path, module.__name__, "digits-cnn")
        assert any(isinstance(m, module) for m in model.modules())
        assert hammer(model, inputs) == []


class _Racy(nn.Module):
    """Keeps the call's input on the module between two steps: the bug under test."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        self._x = x
        time.sleep(0.0005)   # another thread's call lands here
        return self.lin(self._x)


def test_the_harness_catches_per_call_state_kept_on_the_module():
    torch.manual_seed(0)
    model = _Racy().eval()
    inputs = [torch.randn(2, 16) for _ in range(6)]
    assert hammer(model, inputs, rounds=2) != []


def test_intra_op_thread_blocks_from_several_threads_restore_the_count():
    from shrink.modules.decode import intra_op_threads

    was = torch.get_num_threads()
    torch.set_num_threads(3)   # a count the blocks' 1 differs from
    before = torch.get_num_threads()
    start = threading.Barrier(4)
    inside = []

    def worker(i):
        start.wait()
        for _ in range(20):
            with intra_op_threads(1):
                inside.append(torch.get_num_threads())
                time.sleep(0.0005)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    after = torch.get_num_threads()
    torch.set_num_threads(was)
    assert set(inside) == {1} and after == before == 3
