"""The documentation's links lead somewhere and the README stays a five-minute read."""

import re
import subprocess
import sys

from conftest import ROOT

DOCS = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    ROOT / "experiments" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"\]\(([^)#\s]*)(#[^)\s]*)?\)")


def anchors(path):
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for doc in DOCS:
        for target, anchor in LINK.findall(doc.read_text()):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and path.suffix == ".md" and anchor[1:] not in anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target}{anchor}")
    assert not broken, broken


def test_the_readme_is_short_and_says_how_to_extend():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "## Extending" in text and "envelopes/shapes.py" in text


def test_help_points_to_files_that_exist():
    out = subprocess.run(
        [sys.executable, "run_ablation.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    named = set(re.findall(r"\b((?:docs/|experiments/)?[\w-]+\.md)\b", out))
    assert "docs/batching.md" in named
    missing = [name for name in named if not (ROOT / name).exists()]
    assert not missing, missing
