"""The raw-text evaluation: labelled documents through the worker's text path, scored on spans.

Documents are written out as raw text (`training.raw_text`), tagged exactly as `ner-stream run`
tags a message (`Tagger.tag`: `prepare`, then the passes, with the worker's windows and
batching defaults), and scored on entity character spans (`training.evaluate.span_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ner_stream.checkpoint import LoadedModel
from ner_stream.tagger import Tagger, TaggerOptions
from ner_stream.text import has_line_break
from training.datasets import Sentence
from training.evaluate import EntityReport, Scores, SpanErrors, format_report, span_scores
from training.raw_text import render
from training.trainer import evaluate_model


@dataclass
class RawEvaluation:
    """Scores of the raw-text path on one layout, beside the token-level scores of the same data."""

    layout: str
    line_breaks: str
    documents: int
    report: EntityReport  # entity character spans, exact match
    errors: SpanErrors
    token_level: Scores  # the same model on the gold tokenization (conlleval)
    gold_across_line_break: int = 0  # gold entities whose text holds a line break (wraps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the raw-text scores at top level, with layout, errors, token level."""
        return {
            "layout": self.layout,
            "line_breaks": self.line_breaks,
            "documents": self.documents,
            **self.report.to_dict(),
            "errors": self.errors.to_dict(),
            "gold_across_line_break": self.gold_across_line_break,
            "token_level": self.token_level.to_dict(),
            "gap": round(self.token_level.f1 - self.report.micro.f1, 4),
        }


def raw_evaluation(
    loaded: LoadedModel,
    documents: Sequence[Sequence[Sentence]],
    layout: str,
    line_breaks: str,
    device: torch.device,
    batch_docs: int = 64,
) -> RawEvaluation:
    """Tag ``documents`` written out in ``layout`` through the worker's text path and score them.

    The path is `Tagger.tag`: `prepare` (tokenizer, sentence splitting with ``line_breaks``,
    windows of the worker's ``--max-chunk-tokens``), then the passes with the worker's batching
    and precision defaults, as ``ner-stream run`` tags a message. The token-level scores come
    first, from the model on the gold tokens, because the tagger may cast the network. Raises
    ``ValueError`` for an unknown layout or line-break mode.
    """
    sentences = [sentence for document in documents for sentence in document]
    token_report, _ = evaluate_model(
        loaded.model.to(device), loaded.info.vocabs, sentences, loaded.info.config.tag_scheme,
        device,
    )  # fmt: skip
    # TaggerOptions' defaults are the worker's (window size, forward-pass budget, precision).
    tagger = Tagger(loaded, TaggerOptions(device=str(device), line_breaks=line_breaks))
    raw = [render(document, layout) for document in documents]
    predicted: list[list[tuple[int, int, str]]] = []
    for at in range(0, len(raw), batch_docs):
        batch = raw[at : at + batch_docs]
        for doc, entities in zip(batch, tagger.tag([d.text for d in batch]), strict=True):
            for e in entities:
                if doc.text[e.start : e.end] != e.text:
                    raise AssertionError(f"entity {e} does not match its document's text")
            predicted.append([(e.start, e.end, e.type) for e in entities])
    gold = [[(g.start, g.end, g.type) for g in doc.entities] for doc in raw]
    report, errors = span_scores(gold, predicted, [doc.text for doc in raw])
    across = sum(has_line_break(doc.text[g.start : g.end]) for doc in raw for g in doc.entities)
    return RawEvaluation(layout, line_breaks, len(raw), report, errors, token_report.micro, across)


def format_raw_report(result: RawEvaluation) -> str:
    """The conlleval-like table of a raw-text evaluation, with the gap and the error kinds."""
    errors = result.errors
    return "\n".join(
        [
            f"raw text, layout {result.layout}, --line-breaks {result.line_breaks}, "
            f"{result.documents} documents",
            format_report(result.report),
            f"token-level FB1 of the same model on the same data: {result.token_level.f1:6.2f} "
            f"(gap {result.token_level.f1 - result.report.micro.f1:+.2f})",
            f"errors: wrong boundary {errors.wrong_boundary}, wrong type {errors.wrong_type}, "
            f"missed {errors.missed}, spurious {errors.spurious}",
            f"predicted entities across a line break: {errors.crossing_line_break} "
            f"(gold: {result.gold_across_line_break})",
        ]
    )
