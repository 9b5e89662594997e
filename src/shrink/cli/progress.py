"""The one progress reporter: the library reports counts, the CLI draws them on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, done: int) -> None:
        if not self.tty and done != self.total:
            return
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        secs = time.perf_counter() - self.start
        end = "\n" if done >= self.total else ""
        self.stream.write(f"\r{self.label:<22} [{bar}] {done}/{self.total} {secs:5.1f}s{end}")
        self.stream.flush()


def bar_callback():
    """progress(label, done, total) for the library: one bar per label, drawn on stderr."""
    bars: dict[str, Progress] = {}

    def progress(label: str, done: int, total: int) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = Progress(label, total)
        bar(done)

    return progress
