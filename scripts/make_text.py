"""Regenerate ``src/gradwise/data/files/python_reference.txt``, the text shipped for the ``text`` data set.

The prose comes from Python's own ``pydoc_data/topics.py`` (the language-reference topics that
``help()`` shows; PSF licence). Code samples, grammar rules, tables and headings' underlines are
dropped and the remaining paragraphs are kept as plain ASCII text, topic by topic in sorted
order, until about 150 KB. Run with the project's Python: ``.venv/bin/python scripts/make_text.py``
(the output depends on the Python version; the committed file says which one made it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from pydoc_data.topics import topics

TARGET_BYTES = 150_000
OUT = (
    Path(__file__).resolve().parents[1]
    / "src"
    / "gradwise"
    / "data"
    / "files"
    / "python_reference.txt"
)
ASCII = {"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "...", "\xa0": " "}
UNDERLINE = re.compile(r"^([*=\-~^\"+])\1{2,}$")


def prose_paragraphs(text: str) -> list[str]:
    """Unindented paragraphs of a topic, without code, grammar, tables or heading underlines."""
    for src, dst in ASCII.items():
        text = text.replace(src, dst)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.rstrip() for line in block.splitlines() if line.strip()]
        if not lines or lines[0].startswith((" ", "\t")):
            continue  # an indented block: code sample, grammar rule, quoted table
        lines = [line for line in lines if not UNDERLINE.match(line.strip())]
        para = "\n".join(lines)
        if not para or not para.isascii() or "|" in para or ">>>" in para:
            continue
        paragraphs.append(para)
    return paragraphs


def main() -> None:
    chunks: list[str] = []
    size = 0
    for key in sorted(topics):
        for para in prose_paragraphs(topics[key]):
            if size >= TARGET_BYTES:
                break
            chunks.append(para)
            size += len(para) + 2
    OUT.write_text("\n\n".join(chunks) + "\n", encoding="ascii")
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) from Python {version} pydoc_data/topics.py")


if __name__ == "__main__":
    main()
