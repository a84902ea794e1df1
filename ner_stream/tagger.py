"""Tagger: texts in, entities with character offsets and scores out. Knows nothing of Kafka.

The Tagger owns the model's device placement and inference mode. Work is split in two so that a
caller can overlap them: `prepare` (tokenize, chunk, encode: CPU only, pure Python) and
`tag_prepared` (pad into bucketed batches, forward, decode spans).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ner_stream.batching import ROW_MULTIPLE, bucket_length, pad_batch, padded_rows
from ner_stream.checkpoint import LoadedModel, default_model_path, load
from ner_stream.messages import Entity
from ner_stream.model import Batch
from ner_stream.precision import DEFAULT_MAX_F1_CHANGE, Choice, cast_network, checks_of, choose
from ner_stream.spans import OUTSIDE, spans_from_tags
from ner_stream.text import LINE_BREAK_MODES, Token, chunk_document
from ner_stream.vocab import EncodedSentence

DEFAULT_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128)
_EMPTY = EncodedSentence(words=[], chars=[], cases=[])


@dataclass
class Forwarded:
    """Tags [N, T] and confidences [N, T] of a forward pass, and the seconds it took to run."""

    tags: np.ndarray
    scores: np.ndarray
    seconds: float = 0.0

    def ready(self) -> bool:
        return True

    def get(self) -> Forwarded:
        return self


class RunnerResult(Protocol):
    """A forward pass that may still be running elsewhere."""

    def ready(self) -> bool: ...
    def get(self) -> Forwarded: ...


# Padded batches and the real rows of each -> the tags of those rows, now or later.
BatchRunner = Callable[[list[Batch], list[int]], RunnerResult]


@dataclass
class TaggerOptions:
    """How the tagger batches work on its device."""

    device: str = "auto"
    max_chunk_tokens: int = 128  # a longer sentence is cut into windows of this many tokens
    max_batch_tokens: int = 8192  # padded tokens per forward pass
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    precision: str = "auto"  # see ner_stream.precision
    max_f1_change: float = DEFAULT_MAX_F1_CHANGE  # dev-F1 points a reduced precision may move
    line_breaks: str = "auto"  # does a single line break end a sentence? see ner_stream.text

    def __post_init__(self) -> None:
        if self.max_chunk_tokens < 1 or self.max_batch_tokens < self.max_chunk_tokens:
            raise ValueError("need 1 <= max_chunk_tokens <= max_batch_tokens")
        if self.line_breaks not in LINE_BREAK_MODES:
            raise ValueError(
                f"unknown line-break mode {self.line_breaks!r}: use {', '.join(LINE_BREAK_MODES)}"
            )


@dataclass
class PreparedDoc:
    """A document tokenized, chunked and encoded, ready for `Tagger.tag_prepared`."""

    text: str
    chunks: list[list[Token]]
    encoded: list[EncodedSentence]

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass
class BatchStats:
    """Shape of the forward passes of one `tag_prepared` call, for metrics."""

    # The tensor of each pass: (rows, padded length); rows include the empty rows of padding.
    batches: list[tuple[int, int]] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)  # the real sequences of each pass
    real_tokens: int = 0
    inference_s: float = 0.0
    spans_s: float = 0.0

    @property
    def padded_tokens(self) -> int:
        return sum(n * t for n, t in self.batches)


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else CPU. Asking for CUDA without one is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


class Tagger:
    """Named-entity tagger over a loaded model."""

    def __init__(self, loaded: LoadedModel, options: TaggerOptions | None = None) -> None:
        self.options = options or TaggerOptions()
        self.info = loaded.info
        self.device = resolve_device(self.options.device)
        self.precision: Choice = choose(
            self.options.precision,
            self.device,
            checks_of(loaded.info.extra),
            self.options.max_f1_change,
        )
        self.model = loaded.model.to(self.device).eval()
        self.vocabs = loaded.info.vocabs
        self.scheme = loaded.info.config.tag_scheme
        self._pin = self.device.type == "cuda"
        # -1 (no tag) when a model has no "O" tag: every tag then reaches span decoding.
        self._outside = self.vocabs.tags.stoi.get(OUTSIDE, -1)
        if self.precision.precision != "fp32":
            cast_network(self.model, self.precision.precision)
        self._runner: BatchRunner = self._run_here

    @classmethod
    def from_file(cls, path: str | Path | None = None, options: TaggerOptions | None = None):
        """Load a model file (default: the packaged English model)."""
        return cls(load(path or default_model_path()), options)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    def prepare(self, text: str) -> PreparedDoc:
        """Tokenize, chunk and encode one document (CPU, no model involved)."""
        chunks = chunk_document(text, self.options.max_chunk_tokens, self.options.line_breaks)
        encoded = [self.vocabs.encode([t.text for t in c]) for c in chunks]
        return PreparedDoc(text=text, chunks=chunks, encoded=encoded)

    def tag(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Entities of each text, in order."""
        return self.tag_prepared([self.prepare(t) for t in texts])[0]

    def tag_prepared(self, docs: Sequence[PreparedDoc]) -> tuple[list[list[Entity]], BatchStats]:
        """Entities of each prepared document, and the shapes of the batches that were run."""
        items = [(doc, c) for doc in docs for c in range(len(doc.chunks))]
        per_chunk, stats = self.tag_chunks(items)
        out: list[list[Entity]] = [[] for _ in docs]
        index = {id(doc): i for i, doc in enumerate(docs)}
        for (doc, _), entities in zip(items, per_chunk, strict=True):
            out[index[id(doc)]].extend(entities)
        return out, stats

    def tag_chunks(
        self, items: Sequence[tuple[PreparedDoc, int]]
    ) -> tuple[list[list[Entity]], BatchStats]:
        """Entities of each (document, chunk index) item, in item order.

        Chunks of any documents can be mixed, which lets a caller spread a very long document
        over several micro-batches instead of stalling the documents behind it.
        """
        return self.submit(items).result()

    def submit(self, items: Sequence[tuple[PreparedDoc, int]]) -> PendingTags:
        """Start `tag_chunks`; with a model process the forward pass runs while the caller goes on.

        The caller collects `result()` of each submission in the order they were made.
        """
        # Sorted by length, so that sequences of like length share a bucket and little is padded.
        order = sorted(range(len(items)), key=lambda i: len(items[i][0].chunks[items[i][1]]))
        groups = list(self._groups([len(items[i][0].chunks[items[i][1]]) for i in order]))
        rows = [order[g] for group, _ in groups for g in group]
        budget = self.options.max_batch_tokens
        stats = BatchStats(
            batches=[(padded_rows(len(group), pad_to, budget), pad_to) for group, pad_to in groups],
            sequences=[len(group) for group, _ in groups],
        )
        forward = self._start_forward(
            [
                [items[order[g]][0].encoded[items[order[g]][1]] for g in group]
                for group, _ in groups
            ],
            [pad_to for _, pad_to in groups],
        )
        return PendingTags(self, list(items), rows, stats, forward)

    def _decode_rows(
        self,
        items: list[tuple[PreparedDoc, int]],
        rows: list[int],
        tags: np.ndarray,
        scores: np.ndarray,
    ) -> tuple[list[list[Entity]], int]:
        """Entities per item from the tags of `rows` (item indices), and the real tokens seen."""
        results: list[list[Entity]] = [[] for _ in items]
        chunks = [items[i][0].chunks[items[i][1]] for i in rows]
        # Only the tags that are not "O" reach Python, one flat list each, row after row: span
        # decoding then costs per entity token, not per token.
        lengths = np.array([len(c) for c in chunks], dtype=np.int64)
        keep = (tags != self._outside) & (np.arange(tags.shape[1]) < lengths[:, None])
        counts = keep.sum(axis=1).tolist()
        positions = np.nonzero(keep)[1].tolist()
        kept_tags, kept_scores = tags[keep].tolist(), scores[keep].tolist()
        at = 0
        for r, i in enumerate(rows):
            n = counts[r]
            if n:
                doc = items[i][0]
                window = slice(at, at + n)
                results[i] = self._entities(
                    doc, chunks[r], positions[window], kept_tags[window], kept_scores[window]
                )
                at += n
        return results, int(lengths.sum())

    def _entities(
        self,
        doc: PreparedDoc,
        chunk: list[Token],
        positions: list[int],
        tag_ids: list[int],
        scores: list[float],
    ) -> list[Entity]:
        """Entities of one chunk from its non-"O" tags (`positions` ascending)."""
        itos = self.vocabs.tags.itos
        names: list[str] = []
        index: list[int] = []  # position in the chunk of each entry of `names`
        conf: list[float] = []
        previous = -2
        for pos, tag, score in zip(positions, tag_ids, scores, strict=True):
            # One "O" stands for a run of them: for the decoding rules an "O" after an "O"
            # changes nothing.
            if names and pos != previous + 1:
                names.append(OUTSIDE)
                index.append(previous + 1)
                conf.append(0.0)
            names.append(itos[tag])
            index.append(pos)
            conf.append(score)
            previous = pos
        entities = []
        for span in spans_from_tags(names, self.scheme):
            start, end = chunk[index[span.start]].start, chunk[index[span.end - 1]].end
            span_conf = conf[span.start : span.end]
            entities.append(
                Entity(
                    text=doc.text[start:end],
                    type=span.type,
                    start=start,
                    end=end,
                    score=sum(span_conf) / len(span_conf),
                )
            )
        return entities

    def _groups(self, lengths: list[int]):
        """Runs of positions (into `lengths`, sorted ascending) sharing a bucket, under budget."""
        group: list[int] = []
        pad_to = 0
        budget = self.options.max_batch_tokens
        for pos, n in enumerate(lengths):
            if n == 0:
                continue
            # A bucket never pads a lone sequence past the token budget.
            length = min(bucket_length(n, self.options.buckets), max(n, budget))
            # A group of fewer than ROW_MULTIPLE rows would be padded with empty rows anyway:
            # it grows into the next bucket instead, which saves a forward pass.
            small = len(group) < ROW_MULTIPLE
            if group and ((length != pad_to and not small) or (len(group) + 1) * length > budget):
                yield group, pad_to
                group = []
            group.append(pos)
            pad_to = length  # lengths come sorted: the group's longest so far
        if group:
            yield group, pad_to

    def _forward(
        self, groups: list[list[EncodedSentence]], pad_lengths: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tags and confidences of every sentence of `groups`, in order (see `run_batches`)."""
        done = self._start_forward(groups, pad_lengths).get()
        return done.tags, done.scores

    def _start_forward(
        self, groups: list[list[EncodedSentence]], pad_lengths: list[int]
    ) -> RunnerResult:
        if not groups:
            return Forwarded(np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
        batches = []
        budget = self.options.max_batch_tokens
        for sents, pad_to in zip(groups, pad_lengths, strict=True):
            extra = padded_rows(len(sents), pad_to, budget) - len(sents)
            batches.append(pad_batch([*sents, *([_EMPTY] * extra)], pad_to, self._pin))
        return self._runner(batches, [len(sents) for sents in groups])

    def use_runner(self, runner: BatchRunner | None) -> None:
        """Run the padded batches with `runner` (e.g. a model process); None: in this process."""
        self._runner = runner or self._run_here

    def _run_here(self, batches: list[Batch], rows: list[int]) -> Forwarded:
        t0 = time.perf_counter()
        tags, scores = self.run_batches(batches, rows)
        return Forwarded(tags, scores, time.perf_counter() - t0)

    def run_batches(self, batches: list[Batch], rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Tags and confidences of the first `rows[i]` rows of each padded batch, in order.

        The network runs once per batch (one length bucket each); decoding runs once over all of
        them, because the CRF's cost is its number of steps, not the rows it carries.
        """
        return self.decode(self.run_network(batches, rows))

    def run_network(self, batches: list[Batch], rows: list[int]) -> Emissions:
        """The first half of `run_batches`: the network's emissions of the real rows, joined."""
        emissions, masks = [], []
        with torch.inference_mode():
            batches = [b.to(self.device, non_blocking=self._pin) for b in batches]
            chars = self.model.char_features([b.chars for b in batches])
            for i, (batch, n) in enumerate(zip(batches, rows, strict=True)):
                features = None if chars is None else chars[i]
                emissions.append(self.model.emissions(batch, features)[:n])
                masks.append(batch.mask[:n])
            width = max(m.shape[1] for m in masks)
            em = torch.cat([nn.functional.pad(e, (0, 0, 0, width - e.shape[1])) for e in emissions])
            mask = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
        return Emissions(em, mask)

    def decode(self, emissions: Emissions) -> tuple[np.ndarray, np.ndarray]:
        """The second half of `run_batches`: best tags and their confidences."""
        with torch.inference_mode():
            tags, scores = self.model.decode_emissions(emissions.scores, emissions.mask)
        assert scores is not None
        return tags.cpu().numpy(), scores.float().cpu().numpy()


@dataclass
class Emissions:
    """The network's tag scores [N, T, K] of a forward pass and its mask [N, T]."""

    scores: torch.Tensor
    mask: torch.Tensor


@dataclass
class PendingTags:
    """A `Tagger.submit`ted batch: `ready()` once its forward pass is done, `result()` blocks."""

    _tagger: Tagger
    _items: list[tuple[PreparedDoc, int]]
    _rows: list[int]  # item index of each row of the forward pass
    _stats: BatchStats
    _forward: RunnerResult

    def ready(self) -> bool:
        return self._forward.ready()

    def result(self) -> tuple[list[list[Entity]], BatchStats]:
        """Entities of each submitted item, in item order, and the batch shapes."""
        done = self._forward.get()
        t0 = time.perf_counter()
        results, real = self._tagger._decode_rows(self._items, self._rows, done.tags, done.scores)
        self._stats.real_tokens = real
        self._stats.inference_s = done.seconds
        self._stats.spans_s = time.perf_counter() - t0
        return results, self._stats
