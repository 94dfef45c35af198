#!/usr/bin/env python3
"""Builds data/fortunes/ from Debian's fortunes-min package (BSD licence): every
fortune as a {"text"} document, and chats derived from them for fine-tuning.

    apt-get download fortunes-min && dpkg-deb -x fortunes-min_*.deb /tmp/fortunes
    python3 scripts/make-fortunes-data.py /tmp/fortunes/usr/share/games/fortunes data/fortunes

Chats: a fortune with an attribution line ("-- Mark Twain") gives "Who said this? …" →
the attribution; a riddle written as "Q: … A: …" gives the question → the answer; every
other fortune answers "Tell me a fortune." Deterministic: no randomness.
"""
import json
import re
import sys
from pathlib import Path


def fortunes(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    for block in re.split(r"^%\s*$", text, flags=re.M):
        block = block.strip("\n")
        if block.strip():
            yield block


def chat(block):
    lines = block.split("\n")
    # An attribution: the last line starts (after tabs) with "--".
    m = re.match(r"^\s*--\s*(.+)$", lines[-1])
    if m and len(lines) > 1:
        quote = " ".join(l.strip() for l in lines[:-1]).strip()
        return [("user", f"Who said this? {quote}"), ("assistant", m.group(1).strip())]
    qa = re.search(r"^Q:\s*(.+?)\s*^A:\s*(.+)$", block, flags=re.M | re.S)
    if qa:
        q = " ".join(qa.group(1).split())
        a = " ".join(qa.group(2).split())
        return [("user", q), ("assistant", a)]
    aq = re.search(r"^A:\s*(.+?)\s*^Q:\s*(.+)$", block, flags=re.M | re.S)
    if aq:
        # "Questions for the great answers": the answer comes first.
        return [("user", " ".join(aq.group(2).split())), ("assistant", " ".join(aq.group(1).split()))]
    return [("user", "Tell me a fortune."), ("assistant", block.strip())]


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    docs, chats = [], []
    for name in ["fortunes", "literature", "riddles"]:
        for block in fortunes(src / name):
            docs.append({"text": block})
            chats.append({"messages": [{"role": r, "content": c} for r, c in chat(block)]})
    with open(out / "fortunes.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(out / "chat.jsonl", "w", encoding="utf-8") as f:
        for c in chats:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    print(f"{len(docs)} documents, {len(chats)} chats → {out}")


if __name__ == "__main__":
    main()
