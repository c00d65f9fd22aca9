"""Write one benchmark's section into docs/benchmarks.md, keeping the other sections."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every number here comes from a script under `benchmarks/`, run on the machine named in its
section. Re-run a script to refresh its section; the others are kept.
"""


def write_section(name: str, body: str, doc: Path = DOC) -> Path:
    """Replace (or append) the section delimited by `<!-- name:start -->`/`<!-- name:end -->`."""
    text = doc.read_text() if doc.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->",
                         re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc


def table(df: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """A DataFrame as a Markdown table (no extra dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
