"""Evaluation: conlleval entity scores and masked token accuracy.

Entity scores count a prediction as correct only when its span and type both match a gold
entity exactly, with spans decoded by :func:`ner_stream.spans.spans_from_tags` (conlleval's
rules), so the figures equal those of ``conlleval`` on the same tags.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

from ner_stream.spans import Span, spans_from_tags, validate_scheme
from ner_stream.text import has_line_break

T = TypeVar("T")


@dataclass
class Scores:
    """Precision, recall and F1 in percent, with the counts they come from."""

    precision: float  # percent
    recall: float  # percent
    f1: float  # percent
    gold: int  # number of gold entities
    predicted: int
    correct: int

    @classmethod
    def from_counts(cls, gold: int, predicted: int, correct: int) -> Scores:
        """Compute the percentages; a zero denominator gives 0.0 rather than an error."""
        precision = _percent(correct, predicted)
        recall = _percent(correct, gold)
        total = precision + recall
        f1 = 2 * precision * recall / total if total else 0.0
        return cls(precision, recall, f1, gold, predicted, correct)

    def to_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict."""
        return asdict(self)


@dataclass
class EntityReport:
    """Micro-averaged scores over all entities, and the same scores for each entity type."""

    micro: Scores
    per_type: dict[str, Scores]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the micro fields at top level plus ``per_type``."""
        result: dict[str, Any] = self.micro.to_dict()
        result["per_type"] = {name: scores.to_dict() for name, scores in self.per_type.items()}
        return result


def _report(gold: set[T], pred: set[T], type_of: Callable[[T], str]) -> EntityReport:
    """Micro and per-type scores of exact matches between two sets of typed entities."""
    correct = gold & pred
    counts = [Counter(map(type_of, spans)) for spans in (gold, pred, correct)]
    per_type = {
        name: Scores.from_counts(*(count[name] for count in counts))
        for name in sorted(counts[0].keys() | counts[1].keys())
    }
    return EntityReport(Scores.from_counts(len(gold), len(pred), len(correct)), per_type)


def _percent(numerator: int, denominator: int) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def _typed_spans(sentences: Sequence[Sequence[str]], scheme: str) -> set[tuple[int, Span]]:
    """All spans of a corpus, keyed by sentence index so equal spans of two sentences differ."""
    return {
        (index, span)
        for index, tags in enumerate(sentences)
        for span in spans_from_tags(tags, scheme)
    }


def _check_aligned(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {index}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted"
            )


def entity_scores(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], scheme: str = "iob2"
) -> EntityReport:
    """conlleval entity-level scores of predicted against gold tag sequences (one per sentence).

    ``pred`` may be ill-formed (e.g. a model without a CRF); it is decoded as conlleval would.
    Raises ``ValueError`` when the sentences or their lengths do not line up.
    """
    scheme = validate_scheme(scheme)
    _check_aligned(gold, pred)
    return _report(_typed_spans(gold, scheme), _typed_spans(pred, scheme), _span_type)


# The out-of-domain check of a CoNLL-typed model on GMB-style data: GMB's person, geographical
# and geopolitical entities and organisations have CoNLL counterparts; its other types (time,
# artifact, event, natural phenomenon) do not, and CoNLL's MISC has no GMB counterpart.
GMB_TO_CONLL = {"per": "PER", "geo": "LOC", "gpe": "LOC", "org": "ORG"}
UNMAPPED_PREDICTIONS = frozenset({"MISC"})


def mapped_entity_scores(
    gold: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
    gold_types: dict[str, str],
    ignored_predictions: frozenset[str] = UNMAPPED_PREDICTIONS,
) -> EntityReport:
    """conlleval entity scores across two type sets: each gold entity's type is mapped through
    ``gold_types`` (a type it lacks counts as "O": the entity is dropped), and predicted entities
    of ``ignored_predictions`` types are dropped. Both sides are IOB2 tag sequences, one per
    sentence. Raises ``ValueError`` when the sentences or their lengths do not line up.
    """
    _check_aligned(gold, pred)
    gold_spans = {
        (i, Span(s.start, s.end, gold_types[s.type]))
        for i, s in _typed_spans(gold, "iob2")
        if s.type in gold_types
    }
    pred_spans = {
        (i, s) for i, s in _typed_spans(pred, "iob2") if s.type not in ignored_predictions
    }
    return _report(gold_spans, pred_spans, _span_type)


def _span_type(keyed: tuple[int, Span]) -> str:
    return keyed[1].type


def masked_token_accuracy(pred: Any, gold: Any, mask: Any) -> float:
    """Fraction of positions where ``mask`` is true whose predicted id equals the gold id.

    ``pred`` holds argmax ids shaped like ``gold``, or scores with one extra trailing class axis
    (argmaxed here). Inputs are nested lists or numpy arrays; torch tensors must be converted by
    the caller (``.cpu().numpy()``) so that this module needs no torch. An all-false mask gives
    0.0.
    """
    pred_arr, gold_arr, mask_arr = _as_arrays(pred, gold, mask)
    if pred_arr.ndim == gold_arr.ndim + 1:
        pred_arr = pred_arr.argmax(axis=-1)
    if not pred_arr.shape == gold_arr.shape == mask_arr.shape:
        raise ValueError(
            f"shapes differ: pred {pred_arr.shape}, gold {gold_arr.shape}, mask {mask_arr.shape}"
        )
    total = int(mask_arr.sum())
    if total == 0:
        return 0.0
    correct = int(np.logical_and(pred_arr == gold_arr, mask_arr).sum())
    return correct / total


def _as_arrays(pred: Any, gold: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        return np.asarray(pred), np.asarray(gold), np.asarray(mask, dtype=bool)
    except ValueError as error:
        # numpy refuses ragged nested lists; pad the batch (and mask the padding) instead.
        raise ValueError(f"pred, gold and mask must be rectangular (padded): {error}") from error


def _score_line(label: str, scores: Scores, width: int) -> str:
    return (
        f"{label:>{width}}: precision: {scores.precision:6.2f}%; "
        f"recall: {scores.recall:6.2f}%; FB1: {scores.f1:6.2f}  {scores.predicted}"
    )


def format_report(report: EntityReport, accuracy: float | None = None) -> str:
    """A conlleval-like text table; ``accuracy`` is a fraction in [0, 1] shown as percent."""
    micro = report.micro
    lines = [
        f"processed {micro.gold} gold phrases; found: {micro.predicted} phrases; "
        f"correct: {micro.correct}."
    ]
    prefix = f"accuracy: {100.0 * accuracy:6.2f}%; " if accuracy is not None else ""
    lines.append(
        f"{prefix}precision: {micro.precision:6.2f}%; recall: {micro.recall:6.2f}%; "
        f"FB1: {micro.f1:6.2f}"
    )
    # An untyped chunk (bare B/I tags) has the empty type; give it a visible label.
    labels = {name: name or "(untyped)" for name in report.per_type}
    width = max([17, *(len(label) for label in labels.values())])
    for name, scores in report.per_type.items():
        lines.append(_score_line(labels[name], scores, width))
    return "\n".join(lines)


@dataclass
class SpanErrors:
    """How the predicted and gold entities of a raw-text evaluation differ.

    Each prediction that is not exactly right is one of ``wrong_type`` (the span of a gold
    entity, another type), ``wrong_boundary`` (overlaps a gold entity without its exact span,
    whatever the type) or ``spurious`` (overlaps none); ``missed`` counts gold entities no
    prediction overlaps. ``crossing_line_break`` counts predictions whose text holds a line break.
    """

    wrong_boundary: int = 0
    wrong_type: int = 0
    missed: int = 0
    spurious: int = 0
    crossing_line_break: int = 0

    def to_dict(self) -> dict[str, int]:
        """The fields as a plain dict."""
        return asdict(self)


def span_scores(
    gold: Sequence[Sequence[tuple[int, int, str]]],
    pred: Sequence[Sequence[tuple[int, int, str]]],
    texts: Sequence[str],
) -> tuple[EntityReport, SpanErrors]:
    """Exact-match scores of predicted against gold character spans, and the error kinds.

    ``gold[d]`` and ``pred[d]`` are the ``(start, end, type)`` entities of document ``d``, whose
    text is ``texts[d]`` (offsets are code points, ``end`` exclusive). A prediction is correct
    when start, end and type all equal a gold entity's, as conlleval counts chunks. Raises
    ``ValueError`` when the three sequences differ in length.
    """
    if not len(gold) == len(pred) == len(texts):
        raise ValueError(f"{len(gold)} gold, {len(pred)} predicted documents, {len(texts)} texts")
    gold_spans = {(d, *span) for d, spans in enumerate(gold) for span in spans}
    pred_spans = {(d, *span) for d, spans in enumerate(pred) for span in spans}
    report = _report(gold_spans, pred_spans, operator.itemgetter(3))
    errors = SpanErrors()
    for d, (gold_doc, pred_doc, text) in enumerate(zip(gold, pred, texts, strict=True)):
        overlapped: set[tuple[int, int]] = set()
        for start, end, kind in pred_doc:
            if has_line_break(text[start:end]):
                errors.crossing_line_break += 1
            hits = [(s, e, t) for s, e, t in gold_doc if s < end and start < e]
            overlapped.update((s, e) for s, e, _ in hits)
            if (d, start, end, kind) in gold_spans:
                continue
            if any(s == start and e == end for s, e, _ in hits):
                errors.wrong_type += 1
            elif hits:
                errors.wrong_boundary += 1
            else:
                errors.spurious += 1
        errors.missed += sum((s, e) not in overlapped for s, e, _ in gold_doc)
    return report, errors
