"""The language-modelling corpus: the Python standard library's own ``.py`` sources, which ship
with every Python (no download), tokenised by a word-level tokenizer trained on them.

Deterministic for a given Python version: files are taken in sorted order; tokens are
identifiers, numbers, single punctuation characters and newlines; the vocabulary is the
``size - 1`` most frequent tokens (ties broken alphabetically) plus ``<unk>`` (id 0).
"""
from __future__ import annotations

import re
import sysconfig
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|[0-9]+|\n|[^\sA-Za-z_0-9]")
UNK = "<unk>"
_SKIPPED_DIRS = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The stdlib's ``.py`` files in sorted order, tests and third-party packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts))
    if not files:
        raise RuntimeError(f"no .py sources under the standard library {root}; the LM track needs them")
    return files


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text)


class WordTokenizer:
    """Word-level tokenizer: the most frequent tokens of a training text, ``<unk>`` for others."""

    def __init__(self, tokens: list[str], size: int) -> None:
        counts = Counter(tokens)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: size - 1]
        self.vocab = [UNK] + [token for token, _ in ranked]
        self.ids = {token: i for i, token in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, tokens: list[str]) -> Tensor:
        return torch.tensor([self.ids.get(t, 0) for t in tokens], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return " ".join(self.vocab[i] for i in ids.tolist())


def corpus(max_tokens: int, held_out_every: int = 10) -> tuple[list[str], list[str]]:
    """Training and held-out token streams of the stdlib sources, up to ``max_tokens`` in all:
    every ``held_out_every``-th file is held out (no file contributes to both)."""
    train: list[str] = []
    held_out: list[str] = []
    for i, path in enumerate(stdlib_files()):
        (held_out if i % held_out_every == held_out_every - 1 else train).extend(
            tokenize(path.read_text(encoding="utf-8", errors="replace")))
        if len(train) + len(held_out) >= max_tokens:
            break
    return train, held_out
