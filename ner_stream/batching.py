"""Every shape decision of the tagging path: micro-batches of documents (`MicroBatcher`), the
forward passes a micro-batch is run in (`plan_passes`: length buckets, rows per pass, the row
multiple) and the padded tensors of each pass (`pad_pass`, `pad_batch`).

Two budgets, each meaning one thing: a micro-batch holds at most `BatchLimits.max_tokens` real
tokens; a forward pass holds at most `max_pass_tokens` padded positions (rows x length, the empty
rows that round the row count included).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from ner_stream.model import Batch
from ner_stream.vocab import PAD_ID, EncodedSentence

T = TypeVar("T")

# Rows of a forward pass are rounded up to a multiple of this with empty sentences: the LSTM
# kernels are built and cached per shape, and a fresh shape costs about as much as running it,
# so few distinct shapes pay for a few padded rows.
ROW_MULTIPLE = 8
# The padded lengths (tokens) of a pass, ascending. A sequence is padded to the smallest that
# holds it, so that a pass's tensor shape repeats (the LSTM kernels are cached per shape) and
# little is padded.
DEFAULT_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128)


def padded_rows(rows: int, length: int, budget: int, multiple: int = ROW_MULTIPLE) -> int:
    """Rows of the tensor of a forward pass of ``rows`` sequences padded to ``length`` tokens.

    ``rows`` rounded up to a multiple of ``multiple``, but never to more padded positions
    (rows x length) than ``budget`` allows, and never below ``rows``: the caller keeps
    ``rows * length <= budget``, so the pass then holds at most ``budget`` positions.
    """
    rounded = -(-rows // multiple) * multiple
    return max(rows, min(rounded, budget // max(length, 1)))


@dataclass(frozen=True)
class Pass:
    """One forward pass: `sequences` (indices into the planned list) padded to `length` tokens in
    a tensor of `rows` rows (the real sequences, then empty rows up to the row multiple)."""

    sequences: list[int]
    length: int
    rows: int

    @property
    def positions(self) -> int:
        """Padded positions of the pass's tensor (rows x length)."""
        return self.rows * self.length


def plan_passes(
    lengths: Sequence[int],
    buckets: Sequence[int],
    max_pass_tokens: int,
    multiple: int = ROW_MULTIPLE,
) -> list[Pass]:
    """The forward passes that run sequences of `lengths` tokens, shortest first.

    Sequences of like length share a pass padded to their bucket (`bucket_length`); a pass never
    holds more than `max_pass_tokens` padded positions, except a lone sequence longer than that,
    which runs alone at its own length. A run of fewer than `multiple` sequences grows into the
    next bucket rather than closing a pass of its own, which it would fill with empty rows anyway.
    Sequences of no tokens are in no pass. Every other index appears in exactly one pass.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    runs: list[tuple[list[int], int]] = []  # the sequences of each pass, and its length
    current: list[int] = []
    pad_to = 0
    for i in order:
        n = lengths[i]
        if n == 0:
            continue
        # A bucket never pads a lone sequence past the pass budget.
        length = min(bucket_length(n, buckets), max(n, max_pass_tokens))
        small = len(current) < multiple
        if current and (
            (length != pad_to and not small) or (len(current) + 1) * length > max_pass_tokens
        ):
            runs.append((current, pad_to))
            current = []
        current.append(i)
        pad_to = length  # sorted ascending: the longest of the pass so far
    if current:
        runs.append((current, pad_to))
    passes = [
        Pass(seqs, t, padded_rows(len(seqs), t, max_pass_tokens, multiple)) for seqs, t in runs
    ]
    return passes


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
    # Each field of all sentences as one flat array, scattered into the padded tensors by index:
    # a numpy assignment per sentence or per word costs more than the model's work on it.
    lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=b)
    rows = np.repeat(np.arange(b), lengths)
    positions = _positions_within(lengths)
    with_tags = all(s.tags is not None for s in sentences)
    words = np.full((b, t), PAD_ID, dtype=np.int64)
    cases = np.full((b, t), PAD_ID, dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.bool_)
    tags = np.zeros((b, t), dtype=np.int64) if with_tags else None
    words[rows, positions] = _flat([s.words for s in sentences], len(rows))
    cases[rows, positions] = _flat([s.cases for s in sentences], len(rows))
    mask[rows, positions] = True
    if tags is not None:
        tags[rows, positions] = _flat([s.tags for s in sentences], len(rows))
    word_chars = [c for s in sentences for c in s.chars]
    char_counts = np.fromiter(map(len, word_chars), dtype=np.int64, count=len(word_chars))
    chars = np.full((b, t, max(int(char_counts.max(initial=1)), 1)), PAD_ID, dtype=np.int64)
    chars[
        np.repeat(rows, char_counts),
        np.repeat(positions, char_counts),
        _positions_within(char_counts),
    ] = _flat(word_chars, int(char_counts.sum()))
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


_EMPTY = EncodedSentence(words=[], chars=[], cases=[])


def pad_pass(sentences: Sequence[EncodedSentence], plan: Pass, pin_memory: bool = False) -> Batch:
    """The tensors of one planned pass: `sentences` (those of `plan.sequences`, in order), then
    empty rows, padded to `plan.length`: a Batch of `plan.rows` x `plan.length`."""
    empty = [_EMPTY] * (plan.rows - len(sentences))
    return pad_batch([*sentences, *empty], plan.length, pin_memory)


def _positions_within(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[0] - 1, 0, 1, ..., counts[1] - 1, ...: each item's index in its group."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)


def _flat(lists: Sequence[Sequence[int]], total: int) -> np.ndarray:
    """The concatenation of `lists` as one int64 array of `total` items."""
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total)


@dataclass(frozen=True)
class BatchLimits:
    """When a micro-batch is closed: enough documents, enough tokens, or waited long enough."""

    max_docs: int
    max_tokens: int
    max_wait_s: float


class MicroBatcher(Generic[T]):
    """Collects items into micro-batches under `BatchLimits`. Pure: the caller passes the time."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._items: list[T] = []
        self._tokens = 0
        self._opened_at = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def fits(self, tokens: int, reserved: int = 0) -> bool:
        """Whether an item of `tokens` can join without passing the token budget, less `reserved`
        tokens kept for an item that will join when the batch is taken.

        An empty batch takes any item, so that one large document still makes progress.
        """
        return not self._items or self._tokens + tokens + reserved <= self.limits.max_tokens

    def add(self, item: T, tokens: int, now: float) -> None:
        """Add an item; the first item of a batch starts its wait clock."""
        if not self._items:
            self._opened_at = now
        self._items.append(item)
        self._tokens += tokens

    def full(self, reserved_docs: int = 0, reserved_tokens: int = 0) -> bool:
        """Whether the batch has reached its document or token limit, less the room reserved for
        an item that will join when it is taken."""
        limits = self.limits
        return (
            len(self._items) + reserved_docs >= limits.max_docs
            or self._tokens + reserved_tokens >= limits.max_tokens
        )

    @property
    def tokens(self) -> int:
        """Tokens of the items in the batch."""
        return self._tokens

    def due(self, now: float) -> bool:
        """Whether the batch should run now: full, or waited long enough."""
        if not self._items:
            return False
        return self.full() or now - self._opened_at >= self.limits.max_wait_s

    def time_left(self, now: float) -> float | None:
        """Seconds until the wait limit closes the batch (None when empty)."""
        if not self._items:
            return None
        return max(0.0, self._opened_at + self.limits.max_wait_s - now)

    def take(self) -> list[T]:
        """The batch's items; the batcher is empty afterwards."""
        items, self._items, self._tokens = self._items, [], 0
        return items
