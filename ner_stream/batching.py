"""Padding encoded sentences into tensors, and grouping them into length buckets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ner_stream.model import Batch
from ner_stream.vocab import PAD_ID, EncodedSentence


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket length that holds `n` tokens (or `n` itself past the largest)."""
    for b in buckets:
        if n <= b:
            return b
    return n


def pad_batch(
    sentences: Sequence[EncodedSentence], pad_to: int | None = None, pin_memory: bool = False
) -> Batch:
    """Pad sentences to one length (the longest, or `pad_to`) and build CPU tensors.

    Padded positions hold `<PAD>` ids and are false in the mask. Tags are included only when every
    sentence has them.
    """
    if not sentences:
        raise ValueError("cannot pad an empty batch")
    b = len(sentences)
    t = max(max(len(s) for s in sentences), 1)
    if pad_to is not None:
        t = max(t, pad_to)
    max_chars = max((len(c) for s in sentences for c in s.chars), default=1) or 1
    words = np.full((b, t), PAD_ID, dtype=np.int64)
    cases = np.full((b, t), PAD_ID, dtype=np.int64)
    chars = np.full((b, t, max_chars), PAD_ID, dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.bool_)
    with_tags = all(s.tags is not None for s in sentences)
    tags = np.zeros((b, t), dtype=np.int64) if with_tags else None
    for i, s in enumerate(sentences):
        n = len(s)
        words[i, :n] = s.words
        cases[i, :n] = s.cases
        mask[i, :n] = True
        for j, cs in enumerate(s.chars):
            chars[i, j, : len(cs)] = cs
        if tags is not None:
            tags[i, :n] = s.tags
    # A sentence with no tokens still needs one position for the LSTM and the CRF; it is masked
    # out of everything except the CRF's start, and its decoded tags are thrown away.
    mask[:, 0] = True

    def tensor(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a)
        return x.pin_memory() if pin_memory else x

    return Batch(
        words=tensor(words),
        chars=tensor(chars),
        cases=tensor(cases),
        mask=tensor(mask),
        tags=None if tags is None else tensor(tags),
    )
