"""`shrink report DIR [-o FILE]` on a real run: digits-mlp compressed with w4-rtn."""
from __future__ import annotations

import json
import re

from shrink.cli import main


def test_report_of_a_real_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compress", "digits-mlp", "--recipe", "w4-rtn", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(out / "report.html")
    html = (out / "report.html").read_text()
    doc = json.loads((out / "result.json").read_text())
    # one error bar per layer of the step, in the step's error chart
    fig = re.search(r'<figure class="plot" data-plot="layer-error">(.*?)</figure>', html, re.S).group(1)
    bars = re.findall(r'<rect data-mark="bar"[^>]*data-series="error"[^>]*data-layer="([^"]*)"', fig)
    assert bars == [l["name"] for l in doc["steps"][0]["layers"]]
    assert "digits-mlp" in html and "R</b> size" in html
    # -o FILE writes elsewhere and leaves DIR's report alone
    other = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(out), "-o", str(other)]) == 0
    assert other.read_text() == html


def test_report_without_a_result_says_what_to_do(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "result.json" in err and "shrink compress" in err and "Traceback" not in err
    (tmp_path / "result.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
