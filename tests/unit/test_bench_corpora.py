"""The benchmarks' two corpora and the words/s comparison across them (benchmarks/corpus.py,
benchmarks/run_all.py), on made-up results: no broker, no worker, no spaCy."""

from __future__ import annotations

import pytest

from benchmarks import run_all
from benchmarks.corpus import article, documents


def test_articles_are_about_180_words_in_paragraphs_and_always_the_same():
    texts = [d["text"] for d in documents(200, kind="long")]
    words = [len(t.split()) for t in texts]
    assert 175 <= sum(words) / len(words) <= 200
    assert min(words) >= 150
    assert all("\n\n" in t for t in texts if len(t.split()) > 60)
    assert article(7) == article(7) and article(7) != article(8)
    assert documents(3, kind="long")[0]["id"] != documents(3)[0]["id"]


def _e2e(docs_per_s: float, docs: int, words: int) -> dict:
    return {"saturation": {"docs_per_s": docs_per_s}, "settings": {"docs": docs, "words": words}}


def _spacy(*words_per_s: float) -> dict:
    return {"available": True, "runs": [{"words_per_s": w} for w in words_per_s]}


def test_words_per_second_and_the_ratios_to_spacy_per_corpus():
    tag = {"kinds": {"short": {"words_per_s": 30_000}, "long": {"words_per_s": 40_000}},
           "start_up_s": {"median": 5.0}}  # fmt: skip
    words = run_all.corpora(
        _e2e(500, 1000, 64_000), _e2e(200, 100, 18_800), tag, _spacy(5_000, 6_000),
        _spacy(7_000, 4_000),
    )  # fmt: skip
    assert words["short"] == {"worker": 32_000, "tag": 30_000, "tag_start_up_s": 5.0,
                              "spacy": 6_000}  # fmt: skip
    assert words["long"]["worker"] == pytest.approx(37_600)
    assert words["long"]["spacy"] == 7_000  # the better of 1 and 2 processes
    summary = run_all.summarize(None, None, None, tag=tag, spacy_long=_spacy(8_000))
    targets = summary["targets"]
    assert targets["tag_vs_spacy_long"]["value"] == 5.0 and targets["tag_vs_spacy_long"]["met"]
    assert targets["tag_vs_spacy_short"]["value"] is None  # spaCy not measured on it
    assert targets["e2e_vs_spacy_long"]["met"] is None


def test_the_corpora_table_is_written_when_anything_was_measured():
    tag = {"kinds": {"short": {"words_per_s": 30_000}}, "start_up_s": {"median": 5.0}}
    summary = run_all.summarize(None, None, None, tag=tag, spacy_long=None)
    summary["corpora"]["short"]["spacy"] = 6_000
    meta = {"quick": False, "time_utc": "t", "git": {"commit": "c", "dirty": False},
            "cpu_model": "cpu", "cpus": 2, "cpu_flags": "", "load_average": [0.1],
            "cpu_busy_before": 0.0, "python": "3", "torch": "2", "torch_threads": 2,
            "kafka_python": "3", "kafka_broker": None, "spacy": "3.8", "model": "m",
            "wall_s": 1.0}  # fmt: skip
    blocks = run_all.doc_blocks(meta, None, None, None, summary)
    table = blocks["corpora"]
    assert "| short | `ner-stream tag` | 30,000 | 5.00x |" in table
    assert "| long | spaCy small, best of 1 or 2 processes | n/a | 1x |" in table
    assert "5.0 s" in table


def test_end_to_end_against_the_model_core_is_judged_on_each_corpus_with_its_own_core():
    model = {"summary": {"tokens_per_s_bucketed_fp32": 100_000,
                         "tokens_per_s_bucketed_fp32_long": 120_000,
                         "efficiency_bucketed_fp32": 0.3}}  # fmt: skip
    e2e = {"summary": {"tokens_per_s": 85_000}}
    e2e_long = {"summary": {"tokens_per_s": 90_000}}
    targets = run_all.summarize(model, e2e, None, e2e_long=e2e_long)["targets"]
    assert targets["e2e_vs_model_core"]["value"] == pytest.approx(0.85)
    assert targets["e2e_vs_model_core"]["met"] is True
    # 90,000 would pass against the short corpus's core; against the long one's it is 75%.
    assert targets["e2e_vs_model_core_long"]["value"] == pytest.approx(0.75)
    assert targets["e2e_vs_model_core_long"]["met"] is False
    older = {"summary": {"tokens_per_s_bucketed_fp32": 100_000, "efficiency_bucketed_fp32": 0.3}}
    assert run_all.summarize(older, e2e, None, e2e_long=e2e_long)["targets"][
        "e2e_vs_model_core_long"]["met"] is None  # fmt: skip


def test_the_environment_shows_how_the_machine_s_speed_moved_across_the_run():
    meta = {"quick": False, "time_utc": "t", "git": {"commit": "c", "dirty": False},
            "cpu_model": "cpu", "cpus": 2, "cpu_flags": "", "load_average": [0.1],
            "cpu_busy_before": 0.0, "python": "3", "torch": "2", "torch_threads": 2,
            "kafka_python": "3", "kafka_broker": None, "spacy": "3.8", "model": "m",
            "wall_s": 1.0, "speed_probes_ms": {"model": 8.0, "e2e": 10.0, "end": 8.5}}  # fmt: skip
    summary = run_all.summarize(None, None, None)
    env = run_all.doc_blocks(meta, None, None, None, summary)["environment"]
    assert "model 8.0, e2e 10.0, end 8.5 (slowest / fastest 1.25)" in env
    del meta["speed_probes_ms"]  # results of runs before the probe existed
    assert "| n/a |" in run_all.doc_blocks(meta, None, None, None, summary)["environment"]


def test_the_speed_probe_times_a_pass_and_leaves_torch_s_threads_as_they_were():
    import torch

    before = torch.get_num_threads()
    ms = run_all.speed_probe(seconds=0.05)
    assert 0 < ms < 10_000
    assert torch.get_num_threads() == before
