#!/usr/bin/env python3
"""Writes the tokenizer fixtures of crates/train/tests/tokenization.rs with the Python
`tokenizers` package (pip install tokenizers): a byte-level BPE, a SentencePiece-style
unigram and a WordPiece tokenizer trained on data/fortunes/fortunes.jsonl, and for each
the ids Python gives for a test set of texts (the fortunes' chats plus hard cases).

    python3 scripts/make-tokenizer-fixtures.py data/fortunes crates/train/tests/fixtures/tokenizers
"""
import json
import sys
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

src, out = Path(sys.argv[1]), Path(sys.argv[2])
docs = [json.loads(l)["text"] for l in open(src / "fortunes.jsonl", encoding="utf-8") if l.strip()]
chats = [json.loads(l)["messages"] for l in open(src / "chat.jsonl", encoding="utf-8") if l.strip()]
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, special_tokens=specials,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(docs, tr)
    return t


def unigram():
    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.NFKC()
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    tr = trainers.UnigramTrainer(vocab_size=800, special_tokens=["<unk>"] + specials, unk_token="<unk>", show_progress=False)
    t.train_from_iterator(docs, tr)
    return t


def wordpiece():
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    tr = trainers.WordPieceTrainer(vocab_size=900, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False)
    t.train_from_iterator(docs, tr)
    return t


texts = [m["content"] for c in chats[::3] for m in c]
texts += [
    "",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines",
    "naïve café — Zürich, Ærøskøbing; 東京タワー 🎉🚀 ¿qué?",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "<|im_start|>user\nHello<|im_end|>\n",
    "MiXeD CaSe WORDS and punctuation!!! ... ??? ---",
    "a" * 300,
]
for name, make in [("bpe", bpe), ("unigram", unigram), ("wordpiece", wordpiece)]:
    t = make()
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    t.save(str(d / "tokenizer.json"))
    expected = [{"text": s, "ids": t.encode(s).ids} for s in texts]
    with open(d / "expected.json", "w", encoding="utf-8") as f:
        json.dump({"tokenizers_version": tokenizers.__version__, "cases": expected}, f, ensure_ascii=False)
    print(name, t.get_vocab_size(), "tokens,", len(expected), "texts,", sum(len(e["ids"]) for e in expected), "ids")
