"""The tagger: texts in, entities with character offsets and scores out. Knows nothing of Kafka.

Three steps, which a caller may overlap: `prepare` (tokenize, split, cut into windows, encode: CPU,
pure Python), `submit` (plan the passes, pad them, hand them to the runner, in this process or a
model process) and `PendingTags.result` (tags -> entities). `tag` does all three.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from ner_stream.batching import DEFAULT_BUCKETS, pad_pass, plan_passes
from ner_stream.checkpoint import LoadedModel, default_model_path, load
from ner_stream.config import WorkerConfig
from ner_stream.messages import Entity
from ner_stream.precision import Choice, checks_of, choose
from ner_stream.runner import Forwarded, LocalRunner, PendingPass, Runner, resolve_device
from ner_stream.spans import OUTSIDE, spans_from_tags
from ner_stream.text import LINE_BREAK_MODES, Token, document_windows
from ner_stream.vocab import EncodedSentence, Vocabularies

Window = tuple["PreparedDoc", int]  # a document and the index of one of its windows


@dataclass
class TaggerOptions:
    """How the tagger batches work on its device.

    Every field but `buckets` is the worker setting of the same name, and its default is the
    worker's (`WorkerConfig`); `TaggerOptions.of` takes them from a worker's configuration. Raises
    ValueError unless 1 <= max_chunk_tokens <= max_pass_tokens, or for an unknown line-break mode.
    """

    device: str = WorkerConfig.device  # auto, cpu, cuda or a torch device name
    # A longer sentence is cut into windows of this many tokens.
    max_chunk_tokens: int = WorkerConfig.max_chunk_tokens
    # Padded positions (rows x length, the empty rows that round the row count included) in one
    # forward pass.
    max_pass_tokens: int = WorkerConfig.max_pass_tokens
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # padded lengths (tokens), ascending
    precision: str = WorkerConfig.precision  # see ner_stream.precision
    max_f1_change: float = WorkerConfig.max_f1_change  # dev-F1 points a reduced precision may move
    line_breaks: str = WorkerConfig.line_breaks  # does a single line break end a sentence?

    def __post_init__(self) -> None:
        if self.max_chunk_tokens < 1 or self.max_pass_tokens < self.max_chunk_tokens:
            raise ValueError("need 1 <= max_chunk_tokens <= max_pass_tokens")
        if self.line_breaks not in LINE_BREAK_MODES:
            raise ValueError(
                f"unknown line-break mode {self.line_breaks!r}: use {', '.join(LINE_BREAK_MODES)}"
            )

    @classmethod
    def of(cls, cfg: WorkerConfig) -> TaggerOptions:
        """The options of a worker configured by `cfg`: each field that is a worker setting takes
        `cfg`'s value (`buckets` keeps its default). Raises ValueError as the constructor does."""
        settings = {f.name for f in fields(cfg)}
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name in settings})


@dataclass
class PreparedDoc:
    """A document tokenized, split, cut into windows and encoded, ready for `Tagger.submit`.

    A window is what the network tags as one sequence: a sentence, or a part of a sentence longer
    than `--max-chunk-tokens`.
    """

    text: str
    windows: list[list[Token]]
    encoded: list[EncodedSentence]
    # The vocabularies that made `encoded` (None: unknown). A tagger whose model has others (a
    # model swapped in after the document was prepared) encodes the windows again before use.
    vocabs: Vocabularies | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def encode_with(self, vocabs: Vocabularies) -> None:
        """Encode the windows with `vocabs`, unless they already are."""
        if self.vocabs is not vocabs:
            self.encoded = [vocabs.encode([t.text for t in w]) for w in self.windows]
            self.vocabs = vocabs


@dataclass
class BatchStats:
    """The passes of one submission, for metrics: what the tensors held, and the time taken."""

    # The tensor of each pass: (rows, padded length); rows include the empty rows of padding.
    batches: list[tuple[int, int]] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)  # the real sequences of each pass
    real_tokens: int = 0
    inference_s: float = 0.0
    spans_s: float = 0.0

    @property
    def padded_tokens(self) -> int:
        return sum(n * t for n, t in self.batches)


def _token_runs(windows: list[Window], max_tokens: int) -> Iterator[list[Window]]:
    """`windows` in order, cut into runs of at most `max_tokens` tokens (a longer one alone)."""
    run: list[Window] = []
    tokens = 0
    for window in windows:
        n = len(window[0].windows[window[1]])
        if run and tokens + n > max_tokens:
            yield run
            run, tokens = [], 0
        run.append(window)
        tokens += n
    if run:
        yield run


K = TypeVar("K")


class _Batch(Generic[K]):
    """A batch of `Tagger.tag_batches`: its windows, and the answers to its runs so far."""

    def __init__(self, key: K, docs: Sequence[PreparedDoc]) -> None:
        self.key = key
        self.size = len(docs)
        self.windows: list[Window] = [(doc, w) for doc in docs for w in range(len(doc.windows))]
        self.owner = [i for i, doc in enumerate(docs) for _ in doc.windows]  # each window's doc
        self.per_window: list[list[Entity]] = []
        self.stats = BatchStats()
        # Runs submitted and not yet added, plus one until all its runs are submitted.
        self.unanswered = 1

    def add(self, entities: list[list[Entity]], part: BatchStats) -> None:
        """The answer to this batch's next run (runs are answered in order)."""
        self.per_window.extend(entities)
        stats = self.stats
        stats.batches += part.batches
        stats.sequences += part.sequences
        stats.real_tokens += part.real_tokens
        stats.inference_s += part.inference_s
        stats.spans_s += part.spans_s
        self.unanswered -= 1

    def outcome(self) -> tuple[K, list[list[Entity]], BatchStats]:
        out: list[list[Entity]] = [[] for _ in range(self.size)]
        for i, entities in zip(self.owner, self.per_window, strict=True):
            out[i].extend(entities)
        return self.key, out, self.stats


class Tagger:
    """Named-entity tagger over a loaded model.

    `runner` runs the passes: `local` (this process) unless `use_runner` gave another, such as a
    `ModelProcess`.
    """

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
        self.vocabs = loaded.info.vocabs
        self.scheme = loaded.info.config.tag_scheme
        # -1 (no tag) when a model has no "O" tag: every tag then reaches span decoding.
        self._outside = self.vocabs.tags.stoi.get(OUTSIDE, -1)
        self.local = LocalRunner(loaded.model, self.device, self.precision.precision)
        self.runner: Runner = self.local

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

    @property
    def model(self):
        """The network (`NerModel`) the in-process runner holds."""
        return self.local.model

    def labels(self) -> dict[str, str]:
        """What the `ner_stream_model_info` metric says of this tagger: name, version,
        architecture, device and precision."""
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.info.config.arch,
            "device": str(self.device),
            "precision": self.precision.precision,
        }

    def use_runner(self, runner: Runner | None) -> None:
        """Run the passes with `runner` (e.g. a model process); None: in this process."""
        self.runner = runner or self.local

    def prepare(self, text: str) -> PreparedDoc:
        """Tokenize, split, cut into windows and encode one document (CPU, no model involved)."""
        windows = document_windows(text, self.options.max_chunk_tokens, self.options.line_breaks)
        encoded = [self.vocabs.encode([t.text for t in w]) for w in windows]
        return PreparedDoc(text=text, windows=windows, encoded=encoded, vocabs=self.vocabs)

    def tag(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Entities of each text, in order."""
        return self.tag_prepared([self.prepare(t) for t in texts])[0]

    def tag_prepared(
        self, docs: Sequence[PreparedDoc], max_tokens: int | None = None
    ) -> tuple[list[list[Entity]], BatchStats]:
        """Entities of each prepared document, and the shapes of the passes that were run.

        With `max_tokens`, the windows are submitted in runs of at most that many tokens (a
        longer window alone), one after the other, so that the tensors of one submission stay
        bounded however long a document is; the stats are those of all runs together.
        """
        ((_, entities, stats),) = self.tag_batches([(None, docs)], max_tokens)
        return entities, stats

    def tag_batches(
        self,
        batches: Iterable[tuple[K, Sequence[PreparedDoc]]],
        max_tokens: int | None = None,
        in_flight: int = 1,
    ) -> Iterator[tuple[K, list[list[Entity]], BatchStats]]:
        """For each (key, documents) of `batches`, in order: the key, the entities of each of
        its documents, and the shapes of the passes run for them (as `tag_prepared`).

        Lazy: `batches` is read as the results are taken. A batch's windows are submitted in
        runs of at most `max_tokens` tokens (None: one run per batch). Up to `in_flight` runs
        are submitted and not yet answered at a time: with a runner that runs elsewhere (a
        model process), the model works on them while this thread prepares the next batch and
        turns answers into entities; 1 waits for each run's answer before the next is
        submitted. When reading `batches` raises, the batches read before are still tagged and
        yielded, then the error is raised. Raises ValueError when `in_flight` < 1, and what the
        runner raises.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        unfinished: deque[_Batch[K]] = deque()  # in order; the head is yielded once answered
        submitted: deque[tuple[_Batch[K], PendingTags]] = deque()  # runs not yet answered

        def answer_oldest() -> Iterator[tuple[K, list[list[Entity]], BatchStats]]:
            """Wait for the oldest run's answer; yield the batches it finishes, in order."""
            answered, pending = submitted.popleft()
            answered.add(*pending.result())
            yield from finished()

        def finished() -> Iterator[tuple[K, list[list[Entity]], BatchStats]]:
            while unfinished and unfinished[0].unanswered == 0:
                yield unfinished.popleft().outcome()

        source = iter(batches)
        while True:
            try:
                key, docs = next(source)
            except StopIteration:
                break
            except Exception:
                # What was read before the failure is still tagged and handed out first.
                while submitted:
                    yield from answer_oldest()
                raise
            batch = _Batch(key, docs)
            unfinished.append(batch)
            windows = batch.windows
            for run in [windows] if max_tokens is None else _token_runs(windows, max_tokens):
                submitted.append((batch, self.submit(run)))
                batch.unanswered += 1
                if len(submitted) >= in_flight:
                    yield from answer_oldest()
            batch.unanswered -= 1  # every run submitted
            yield from finished()
        while submitted:
            yield from answer_oldest()

    def submit(self, windows: Sequence[Window]) -> PendingTags:
        """Start tagging `windows` (of any documents, mixed); returns at once when the runner
        runs elsewhere. Collect `result()` of each submission in the order they were made.

        A document prepared by another tagger (with other vocabularies: the model was swapped
        since) is encoded again with this one's first.

        Raises what the runner raises when it cannot take the passes (`ModelProcessError` for a
        dead model process).
        """
        windows = list(windows)
        for doc in {id(doc): doc for doc, _ in windows}.values():
            doc.encode_with(self.vocabs)
        lengths = [len(doc.windows[w]) for doc, w in windows]
        passes = plan_passes(lengths, self.options.buckets, self.options.max_pass_tokens)
        stats = BatchStats(
            batches=[(p.rows, p.length) for p in passes],
            sequences=[len(p.sequences) for p in passes],
        )
        rows = [i for p in passes for i in p.sequences]
        if not passes:
            pending: PendingPass = Forwarded(
                np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
            )
        else:
            pin = self.local.pin_memory
            batches = [
                pad_pass([windows[i][0].encoded[windows[i][1]] for i in p.sequences], p, pin)
                for p in passes
            ]
            pending = self.runner(batches, [len(p.sequences) for p in passes])
        return PendingTags(self, windows, rows, stats, pending)

    def entities_of_rows(
        self,
        windows: list[Window],
        rows: list[int],
        tags: np.ndarray,
        scores: np.ndarray,
    ) -> tuple[list[list[Entity]], int]:
        """Entities per window from the tags [R, T] and confidences [R, T] of the pass rows,
        `rows[r]` being the window of row r; and the real tokens seen."""
        results: list[list[Entity]] = [[] for _ in windows]
        tokens = [windows[i][0].windows[windows[i][1]] for i in rows]
        # Only the tags that are not "O" reach Python, one flat list each, row after row: span
        # decoding then costs per entity token, not per token.
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        keep = (tags != self._outside) & (np.arange(tags.shape[1]) < lengths[:, None])
        counts = keep.sum(axis=1).tolist()
        positions = np.nonzero(keep)[1].tolist()
        kept_tags, kept_scores = tags[keep].tolist(), scores[keep].tolist()
        at = 0
        for r, i in enumerate(rows):
            n = counts[r]
            if n:
                doc = windows[i][0]
                run = slice(at, at + n)
                results[i] = self._entities(
                    doc, tokens[r], positions[run], kept_tags[run], kept_scores[run]
                )
                at += n
        return results, int(lengths.sum())

    def _entities(
        self,
        doc: PreparedDoc,
        window: list[Token],
        positions: list[int],
        tag_ids: list[int],
        scores: list[float],
    ) -> list[Entity]:
        """Entities of one window from its non-"O" tags (`positions` ascending)."""
        itos = self.vocabs.tags.itos
        names: list[str] = []
        index: list[int] = []  # position in the window of each entry of `names`
        conf: list[float] = []
        previous = -2
        for pos, tag, score in zip(positions, tag_ids, scores, strict=True):
            # One "O" stands for a run of them: for the span rules an "O" after an "O" changes
            # nothing.
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
            start, end = window[index[span.start]].start, window[index[span.end - 1]].end
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


@dataclass
class PendingTags:
    """A `Tagger.submit`ted set of windows: `ready()` once its passes are done, `result()` waits."""

    _tagger: Tagger
    _windows: list[Window]
    _rows: list[int]  # window index of each real row of the passes, in order
    _stats: BatchStats
    _pending: PendingPass

    @property
    def tagger(self) -> Tagger:
        """The tagger that runs these windows (its model names the outputs)."""
        return self._tagger

    def ready(self) -> bool:
        """Whether the passes are answered: `result` then waits for nothing but span decoding."""
        return self._pending.ready()

    def result(self) -> tuple[list[list[Entity]], BatchStats]:
        """Entities of each submitted window, in order, and the pass shapes.

        Raises what the runner raises for passes that failed (`ModelProcessError` when a model
        process died with them).
        """
        done = self._pending.get()
        t0 = time.perf_counter()
        results, real = self._tagger.entities_of_rows(
            self._windows, self._rows, done.tags, done.scores
        )
        self._stats.real_tokens = real
        self._stats.inference_s = done.seconds
        self._stats.spans_s = time.perf_counter() - t0
        return results, self._stats
