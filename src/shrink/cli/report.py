"""`shrink report DIR [-o FILE]`: render DIR/result.json to one self-contained HTML page."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write the HTML report of a run (plots embedded, no network)",
                       description="Render the result.json that `shrink compress` or `shrink search` left in DIR "
                                   "to one self-contained HTML page (inline SVG plots), DIR/report.html by default.")
    p.add_argument("dir", metavar="DIR", help="a directory holding result.json (or the path of a result .json file)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write the page (default: DIR/report.html)")


def run(args) -> int:
    from shrink.report import write_report

    print(write_report(args.dir, args.output))
    return 0
