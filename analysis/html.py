"""``report.html``: a sweep's report as one self-contained page (tables, the paper side by side, figures inline).

The page is ``report.md`` rendered by Python-Markdown (its ``tables``
extension), with every figure the report links embedded as a base64 PNG,
so the file can be mailed, archived or opened anywhere without its folder.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import markdown

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
code { background: #f4f4f4; padding: 0 0.2rem; }
"""


def _inline_images(text: str, base: Path) -> str:
    """Replace ``![alt](figures/x.png)`` links by data URIs of the files (left as they are if missing)."""

    def embed(match: re.Match) -> str:
        alt, target = match.group(1), match.group(2)
        path = base / target
        if path.suffix.lower() != ".png" or not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{alt}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", embed, text)


def write_html(report_md: Path, title: str | None = None) -> Path:
    """Write ``report.html`` beside ``report_md``; return its path."""
    text = _inline_images(report_md.read_text(), report_md.parent)
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    title = title or f"Sweep report: {report_md.parent.name}"
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    out = report_md.with_suffix(".html")
    out.write_text(page)
    return out
