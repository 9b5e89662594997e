"""`shrink compress`: DIR/result.json and DIR/model agree with each other and with the model."""
from __future__ import annotations

import json
import subprocess
import sys

import torch


def run(*args):
    return subprocess.run([sys.executable, "-m", "shrink", *args], capture_output=True, text=True, timeout=900,
                          env={"HF_HUB_OFFLINE": "1", **__import__("os").environ})


def test_compress_digits_writes_a_result_that_matches_the_saved_model(tmp_path):
    import shrink
    from shrink.models.digits import digits_data

    out = tmp_path / "run"
    r = run("compress", "digits-mlp", "--recipe", "int8", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == json.loads((out / "result.json").read_text())
    for key in ("recipe", "baseline", "compressed", "steps"):
        assert key in doc
    assert doc["recipe"] == [{"rtn": {"bits": 8, "group_size": None, "symmetric": True, "observer": "minmax"}}]
    assert doc["compressed"]["params"] == doc["baseline"]["params"]
    # quality recomputed from the saved model equals what result.json says
    model = shrink.load(out)
    split = digits_data()
    with torch.no_grad():
        acc = float((model(split.x_test).argmax(-1) == split.y_test).float().mean())
    assert acc == doc["compressed"]["quality"]["value"]
    assert doc["compressed"]["quality"]["value"] >= doc["baseline"]["quality"]["value"] - 0.01
    # sizes: the layers' stored bytes add up to what was saved
    layers = doc["steps"][0]["layers"]
    saved = sum(l["bytes_fp32"] - l["bytes_stored"] for l in layers)
    assert doc["baseline"]["size_bytes"] - doc["compressed"]["size_bytes"] == saved


def test_compress_bad_input_is_one_line_exit_2(tmp_path):
    for args, needle in ((["compress", "digits-mlp", "--recipe", "w4-gptk", "-o", str(tmp_path / "a")], "w4-gptq"),
                         (["compress", "no-such-model", "--recipe", "int8", "-o", str(tmp_path / "b")], "no-such-model")):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_compress_digits_cnn_gptq_calibrates_on_training_images(tmp_path):
    """The digits models calibrate on their training split: GPTQ on the CNN's convs from the CLI."""
    out = tmp_path / "cnn"
    r = run("compress", "digits-cnn", "--recipe", "w4-gptq", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "result.json").read_text())
    layers = doc["steps"][0]["layers"]
    convs = [l for l in layers if "im2col" in l["note"]]
    assert len(convs) == 2 and all(l["error"] <= l["error_rtn"] for l in convs)
    assert doc["compressed"]["quality"]["value"] >= doc["baseline"]["quality"]["value"] - 0.02


def test_eval_of_a_compressed_dir_agrees_with_its_result(tmp_path):
    out = tmp_path / "run"
    r = run("compress", "digits-cnn", "--recipe", "w4-rtn", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("latency_ms", "energy", "latency"):
        assert key in doc["baseline"] and key in doc["compressed"]
    assert set(doc["ratios"]) == {"R", "A", "L", "E"} and doc["ratios"]["E"] > 1
    e = run("eval", str(out), "--json")
    assert e.returncode == 0, e.stderr
    got = json.loads(e.stdout)
    assert got["source_model"] == "digits-cnn"
    assert got["size_bytes"] == doc["compressed"]["size_bytes"] and got["params"] == doc["compressed"]["params"]
    assert got["quality"] == doc["compressed"]["quality"]  # same held-out split, same saved codes
    assert got["energy"]["joules"] == doc["compressed"]["energy"]["joules"]
    assert got["latency_ms"] > 0
    bad = run("eval", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_source_scores_on_the_users_text(tmp_path):
    """--eval FILE: perplexity on that text, in compress and in eval, equal to a direct
    computation with the same tokenizer; a non-text model refuses it."""
    from shrink.data.calibration import token_stream
    from shrink.models.io import load, load_tokenizer
    from shrink.models.tiny_gpt import stream_perplexity

    text = tmp_path / "held.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(200)))
    out = tmp_path / "run"
    r = run("compress", "tiny-gpt", "--recipe", "w4-rtn", "--eval", str(text), "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["eval_source"] == str(text) and doc["baseline"]["quality"]["name"] == "perplexity"
    stream = token_stream(load_tokenizer("tiny-gpt"), [text.read_text()])
    with torch.no_grad():
        direct = stream_perplexity(load("tiny-gpt").eval(), stream, 128, 16384)
    assert abs(doc["baseline"]["quality"]["value"] - direct) < 1e-6 * direct
    e = run("eval", str(out), "--eval", str(text), "--json")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["quality"]["value"] == doc["compressed"]["quality"]["value"]
    bad = run("eval", "digits-mlp", "--eval", str(text))
    assert bad.returncode == 2 and "held-out digits split" in bad.stderr
    missing = run("compress", "tiny-gpt", "--recipe", "w4-rtn", "--eval", str(tmp_path / "no.txt"), "-o", str(out))
    assert missing.returncode == 2 and "no such file" in missing.stderr
