"""The written report in a real browser: Debian's headless Chromium loads it from a
file:// URL, runs the page's own check script, and every plot must have drawn marks
with a non-empty bounding box. A screenshot must show more than a blank page."""
from __future__ import annotations

import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from report_fixtures import KINDS

from shrink.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (scripts/setup_env.sh installs "
                                                                "Debian's chromium when run as root)")


def chromium(tmp: Path, *args: str) -> str:
    r = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def png_info(path: Path) -> tuple[int, int, bytes]:
    """(width, height, inflated IDAT bytes) of a PNG, its chunks and CRCs checked."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert size is not None
    return size[0], size[1], zlib.decompress(idat)


@pytest.fixture
def report(tmp_path, full_result) -> Path:
    (tmp_path / "result.json").write_text(json.dumps(full_result))
    return write_report(tmp_path)


def test_every_plot_draws_in_chromium(tmp_path, report):
    figures = len(re.findall(r'<figure class="plot"', report.read_text()))
    dom = chromium(tmp_path, "--dump-dom", report.as_uri())
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body))
    assert figures > 0
    assert attrs.get("data-plots-total") == str(figures)
    assert attrs.get("data-plots-drawn") == str(figures), re.findall(r'data-plot="([^"]+)" data-drawn="no"', dom)
    assert set(attrs["data-plot-kinds"].split()) == KINDS


def test_the_screenshot_is_not_blank(tmp_path, report):
    shot, blank = tmp_path / "report.png", tmp_path / "blank.png"
    (tmp_path / "blank.html").write_text("<!DOCTYPE html><html><body></body></html>")
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri())
    chromium(tmp_path, f"--screenshot={blank}", "--window-size=1200,3000", (tmp_path / "blank.html").as_uri())
    w, h, pixels = png_info(shot)
    assert (w, h) == (1200, 3000) and len(pixels) > w * h  # at least one byte per pixel, plus filters
    # a blank page compresses to almost nothing; plots, text and tables do not
    assert shot.stat().st_size > 5 * blank.stat().st_size and shot.stat().st_size > 50_000
    assert len(set(pixels[: len(pixels) // 2])) > 64  # many distinct (filtered) byte values in the top half


def test_a_real_runs_report_draws_in_chromium(tmp_path):
    from shrink.cli import main

    out = tmp_path / "run"
    assert main(["compress", "digits-mlp", "--recipe", "w4-rtn", "--device", "rtx-4090", "-o", str(out)]) == 0
    report = write_report(out)
    dom = chromium(tmp_path, "--dump-dom", report.as_uri())
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom).group(1)))
    assert int(attrs["data-plots-drawn"]) == int(attrs["data-plots-total"]) > 0
    assert {"layer-error", "layer-sqnr", "weight-hist", "staircase", "memory-fit", "roofline"} <= set(
        attrs["data-plot-kinds"].split())
