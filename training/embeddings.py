"""Pretrained word vectors from GloVe or word2vec text files (optionally gzipped)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Embeddings:
    """Words and their vectors, one row per word."""

    words: list[str]
    vectors: np.ndarray  # [N, D], float32

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def load_embeddings(path: str | Path) -> Embeddings:
    """Read `word v1 v2 ...` lines; a word2vec header line (`count dim`) is skipped.

    Words are lowercased (the model looks words up lowercase); the first vector of a word wins.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    dim = None
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if len(parts) < 2:
                continue
            if dim is None:
                dim = len(parts) - 1
            if len(parts) - 1 != dim:
                raise ValueError(
                    f"{path}:{lineno}: expected {dim} numbers after the word, got {len(parts) - 1}"
                )
            word = parts[0].lower()
            if word in seen:
                continue
            seen.add(word)
            words.append(word)
            rows.append(np.asarray(parts[1:], dtype=np.float32))
    if not rows:
        raise ValueError(f"{path}: no vectors found")
    return Embeddings(words=words, vectors=np.stack(rows))
