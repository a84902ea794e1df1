"""conlleval entity scores, masked token accuracy and the text report."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from training.evaluate import (
    GMB_TO_CONLL,
    EntityReport,
    Scores,
    entity_scores,
    format_report,
    mapped_entity_scores,
    masked_token_accuracy,
)

# Three gold entities, two predicted, one of them correct (PER): P=50, R=33.33, F=40.
GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
PRED = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG"]]


def test_hand_computed_micro_scores() -> None:
    micro = entity_scores(GOLD, PRED).micro
    assert (micro.gold, micro.predicted, micro.correct) == (3, 2, 1)
    assert micro.precision == pytest.approx(50.0)
    assert micro.recall == pytest.approx(100 / 3)
    assert micro.f1 == pytest.approx(40.0)


def test_per_type_scores() -> None:
    per_type = entity_scores(GOLD, PRED).per_type
    assert list(per_type) == ["LOC", "ORG", "PER"]
    assert per_type["PER"] == Scores(100.0, 100.0, 100.0, gold=1, predicted=1, correct=1)
    assert per_type["LOC"] == Scores(0.0, 0.0, 0.0, gold=1, predicted=0, correct=0)
    assert per_type["ORG"] == Scores(0.0, 0.0, 0.0, gold=1, predicted=1, correct=0)


def test_exact_boundaries_and_type_are_required() -> None:
    gold = [["B-PER", "I-PER", "O"]]
    assert entity_scores(gold, [["B-PER", "O", "O"]]).micro.correct == 0
    assert entity_scores(gold, [["B-LOC", "I-LOC", "O"]]).micro.correct == 0
    assert entity_scores(gold, [["B-PER", "I-PER", "I-PER"]]).micro.correct == 0
    assert entity_scores(gold, [["B-PER", "I-PER", "O"]]).micro.f1 == pytest.approx(100.0)


def test_ill_formed_predictions_are_decoded_leniently() -> None:
    # I- opening an entity is the same span as B-; BIOES output without a CRF likewise.
    assert entity_scores([["B-PER", "I-PER"]], [["I-PER", "I-PER"]]).micro.correct == 1
    bioes = entity_scores([["B-PER", "E-PER", "O"]], [["I-PER", "E-PER", "O"]], scheme="bioes")
    assert bioes.micro.correct == 1
    split = entity_scores([["B-PER", "I-PER"]], [["B-PER", "B-PER"]])
    assert (split.micro.predicted, split.micro.correct) == (2, 0)


def test_equal_spans_in_different_sentences_do_not_match() -> None:
    report = entity_scores([["B-PER"], ["O"]], [["O"], ["B-PER"]])
    assert (report.micro.gold, report.micro.predicted, report.micro.correct) == (1, 1, 0)


def test_zero_division_gives_zero() -> None:
    empty = entity_scores([["O", "O"]], [["O", "O"]])
    assert empty.micro == Scores(0.0, 0.0, 0.0, gold=0, predicted=0, correct=0)
    assert empty.per_type == {}
    assert entity_scores([], []).micro.f1 == 0.0


def test_misaligned_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="2 gold sentences but 1 predicted"):
        entity_scores([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="tag scheme"):
        entity_scores([["O"]], [["O"]], scheme="bio")


def test_to_dict_is_json_ready() -> None:
    data = json.loads(json.dumps(entity_scores(GOLD, PRED).to_dict()))
    assert data["precision"] == pytest.approx(50.0)
    assert data["recall"] == pytest.approx(33.333, abs=1e-3)
    assert data["f1"] == pytest.approx(40.0)
    assert (data["gold"], data["predicted"], data["correct"]) == (3, 2, 1)
    assert set(data["per_type"]) == {"LOC", "ORG", "PER"}
    assert data["per_type"]["PER"] == {
        "precision": 100.0,
        "recall": 100.0,
        "f1": 100.0,
        "gold": 1,
        "predicted": 1,
        "correct": 1,
    }


def test_format_report() -> None:
    text = format_report(entity_scores(GOLD, PRED), accuracy=0.975)
    lines = text.splitlines()
    assert lines[0] == "processed 3 gold phrases; found: 2 phrases; correct: 1."
    assert lines[1] == "accuracy:  97.50%; precision:  50.00%; recall:  33.33%; FB1:  40.00"
    assert lines[2].strip() == "LOC: precision:   0.00%; recall:   0.00%; FB1:   0.00  0"
    assert lines[4].strip() == "PER: precision: 100.00%; recall: 100.00%; FB1: 100.00  1"
    assert len(lines) == 5
    without = format_report(EntityReport(Scores(0.0, 0.0, 0.0, 0, 0, 0), {}))
    assert "accuracy" not in without
    assert without.splitlines()[1].startswith("precision:   0.00%")


# --- conlleval reference -------------------------------------------------------------------
# An independent port of conlleval's counting loop (found/correct chunks via the inCorrect
# state machine, not via span sets), with the BIOES-aware chunk rules of its Python port.


def _ref_split(tag: str) -> tuple[str, str]:
    if "-" in tag:
        prefix, kind = tag.split("-", 1)
        return prefix, kind
    return tag, ""


def _ref_end(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    rules = {("B", "B"), ("B", "S"), ("B", "O"), ("I", "B"), ("I", "S"), ("I", "O")}
    return (
        prev in ("E", "S") or (prev, tag) in rules or (prev not in ("O", ".") and prev_type != kind)
    )


def _ref_start(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    rules = {("E", "E"), ("E", "I"), ("S", "E"), ("S", "I"), ("O", "E"), ("O", "I")}
    return (
        tag in ("B", "S") or (prev, tag) in rules or (tag not in ("O", ".") and prev_type != kind)
    )


def _conlleval_counts(gold: list[list[str]], pred: list[list[str]]) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {"gold": Counter(), "pred": Counter(), "correct": Counter()}
    in_correct = False
    last_c, last_c_type, last_g, last_g_type = "O", "", "O", ""
    stream = [
        pair
        for g, p in zip(gold, pred, strict=True)
        for pair in [*zip(g, p, strict=True), ("O", "O")]
    ]
    for correct_tag, guessed_tag in stream:
        c, c_type = _ref_split(correct_tag)
        g, g_type = _ref_split(guessed_tag)
        c_end = _ref_end(last_c, c, last_c_type, c_type)
        g_end = _ref_end(last_g, g, last_g_type, g_type)
        if in_correct:
            if c_end and g_end and last_g_type == last_c_type:
                in_correct = False
                counts["correct"][last_c_type] += 1
            elif c_end != g_end or g_type != c_type:
                in_correct = False
        c_start = _ref_start(last_c, c, last_c_type, c_type)
        g_start = _ref_start(last_g, g, last_g_type, g_type)
        if c_start and g_start and g_type == c_type:
            in_correct = True
        if c_start:
            counts["gold"][c_type] += 1
        if g_start:
            counts["pred"][g_type] += 1
        last_c, last_c_type, last_g, last_g_type = c, c_type, g, g_type
    return counts


def _random_sentence(rng: random.Random, length: int) -> list[str]:
    alphabet = ["O"] * 4 + ["B", "I"]
    alphabet += [f"{prefix}-{kind}" for prefix in "BIES" for kind in ("PER", "LOC")]
    return [rng.choice(alphabet) for _ in range(length)]


def _perturb(rng: random.Random, tags: list[str]) -> list[str]:
    # Mostly-right predictions exercise the "correct" count far more than independent noise.
    return [tag if rng.random() < 0.7 else _random_sentence(rng, 1)[0] for tag in tags]


@pytest.mark.parametrize("seed", range(5))
def test_matches_conlleval_counting_on_random_ill_formed_tags(seed: int) -> None:
    rng = random.Random(seed)
    gold = [_random_sentence(rng, rng.randint(0, 10)) for _ in range(300)]
    pred = [_perturb(rng, tags) for tags in gold]
    report = entity_scores(gold, pred, scheme="bioes")
    ref = _conlleval_counts(gold, pred)
    micro = report.micro
    assert (micro.gold, micro.predicted, micro.correct) == (
        ref["gold"].total(),
        ref["pred"].total(),
        ref["correct"].total(),
    )
    assert micro.correct > 0
    for kind, scores in report.per_type.items():
        assert (scores.gold, scores.predicted, scores.correct) == (
            ref["gold"][kind],
            ref["pred"][kind],
            ref["correct"][kind],
        ), kind


# --- masked token accuracy -------------------------------------------------------------------

PRED_IDS = [[1, 2, 0], [3, 0, 0]]
GOLD_IDS = [[1, 1, 5], [3, 4, 4]]  # padding positions hold values the prediction misses
MASK = [[1, 1, 0], [1, 0, 0]]


def test_masked_accuracy_ignores_padding() -> None:
    assert masked_token_accuracy(PRED_IDS, GOLD_IDS, MASK) == pytest.approx(2 / 3)
    # Padding that happens to agree must not inflate the figure either.
    assert masked_token_accuracy([[1, 0, 0]], [[2, 0, 0]], [[1, 0, 0]]) == 0.0


def test_masked_accuracy_numpy_and_scores() -> None:
    pred = np.array(PRED_IDS, dtype=np.int64)
    assert masked_token_accuracy(pred, np.array(GOLD_IDS), np.array(MASK, dtype=bool)) == (
        pytest.approx(2 / 3)
    )
    # Scores with a trailing class axis are argmaxed first.
    scores = np.eye(6)[pred]
    assert scores.shape == (2, 3, 6)
    assert masked_token_accuracy(scores, GOLD_IDS, MASK) == pytest.approx(2 / 3)


def test_masked_accuracy_edge_cases() -> None:
    assert masked_token_accuracy([[1, 2]], [[1, 2]], [[0, 0]]) == 0.0
    assert masked_token_accuracy([1, 2, 3], [1, 2, 3], [1, 1, 1]) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        masked_token_accuracy([[1, 2]], [[1, 2, 3]], [[1, 1, 1]])
    with pytest.raises(ValueError, match="rectangular"):
        masked_token_accuracy([[1, 2], [1]], [[1, 2], [1]], [[1, 1], [1]])


def test_mapped_scores_map_gold_types_and_ignore_unmapped_ones_on_both_sides():
    gold = [["B-per", "I-per", "O", "B-gpe", "B-geo", "O", "B-tim", "B-org"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-MISC", "B-LOC", "B-ORG"]]
    report = mapped_entity_scores(gold, pred, GMB_TO_CONLL)
    # gpe and geo both count as LOC; the gold time expression is O, so the LOC predicted there
    # is a false positive; the predicted MISC is ignored.
    assert (report.micro.gold, report.micro.predicted, report.micro.correct) == (4, 5, 4)
    assert set(report.per_type) == {"PER", "LOC", "ORG"}
    assert report.per_type["LOC"].predicted == 3 and report.per_type["LOC"].correct == 2
    with pytest.raises(ValueError):
        mapped_entity_scores(gold, [pred[0][:-1]], GMB_TO_CONLL)
