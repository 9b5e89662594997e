"""The report layer: a run's result.json rendered to one self-contained HTML page.

It reads only the result schema (API.md) and never touches a model:

    from shrink.report import render_html, write_report
    html = render_html(result)            # result: the dict in DIR/result.json
    path = write_report("out/")           # writes out/report.html atomically
"""
from .html import render_html, write_report
from .svg import PlotSkipped

__all__ = ["render_html", "write_report", "PlotSkipped"]
