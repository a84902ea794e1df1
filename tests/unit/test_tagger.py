"""The Tagger on tiny models: the offsets contract, order, chunking and batch shapes."""

from __future__ import annotations

import random

import pytest
import torch

from ner_stream.batching import bucket_length, pad_batch
from ner_stream.spans import spans_from_tags
from ner_stream.tagger import Tagger, TaggerOptions, resolve_device
from tests.fakes import WORDS, make_tagger, random_model, rigged_model

UNICODE_TEXTS = [
    "Peter went to Paris.",
    "Ünïcödé Peter 😀 went to Paris 🇫🇷 .",
    "Grüße aus Zürich, sagte Peter zu 王小明 in 東京.",
    "e\u0301te\u0301 a\u0300 Paris , Peter !",  # decomposed accents
    "  \t\n leading and trailing space Paris   ",
]


@pytest.fixture(scope="module")
def rigged() -> Tagger:
    return make_tagger("rigged")


@pytest.fixture(scope="module")
def rnd() -> Tagger:
    return make_tagger("random")


def assert_offsets_valid(text: str, entities) -> None:
    for e in entities:
        assert 0 <= e.start < e.end <= len(text)
        assert e.text == text[e.start : e.end]
        assert e.text.strip() == e.text and e.text
        assert 0.0 <= e.score <= 1.0


def test_entity_offsets_are_valid_for_unicode_text(rnd):
    results = rnd.tag(UNICODE_TEXTS)
    assert len(results) == len(UNICODE_TEXTS)
    assert sum(len(r) for r in results) > 0  # random weights tag plenty: the check is not empty
    for text, entities in zip(UNICODE_TEXTS, results, strict=True):
        assert_offsets_valid(text, entities)
        starts = [e.start for e in entities]
        assert starts == sorted(starts)
        for a, b in zip(entities, entities[1:], strict=False):
            assert a.end <= b.start  # spans do not overlap


def test_the_rigged_model_finds_its_words_at_the_right_offsets(rigged):
    text = "Ünïcödé Peter 😀 went to Paris 🇫🇷 ."
    [entities] = rigged.tag([text])
    assert [(e.text, e.type, e.start) for e in entities] == [
        ("Peter", "PER", text.index("Peter")),
        ("Paris", "LOC", text.index("Paris")),
    ]


def test_names_with_soft_hyphens_and_zero_width_spaces_are_found_whole(rigged):
    # Format characters inside a name neither cut it apart nor hide it from the vocabulary; the
    # entity's text and offsets include them.
    text = "Pe\u00adter went to Pa\u200bris \u2060. Pe\u2060ter\u00ad went to \ufeffPa\u00adris."
    [entities] = rigged.tag([text])
    assert_offsets_valid(text, entities)
    assert [(e.text, e.type, e.start) for e in entities] == [
        ("Pe\u00adter", "PER", 0),
        ("Pa\u200bris", "LOC", text.index("Pa\u200bris")),
        ("Pe\u2060ter", "PER", text.index("Pe\u2060ter")),
        ("Pa\u00adris", "LOC", text.index("Pa\u00adris")),
    ]


def test_a_name_with_soft_hyphens_is_prepared_like_the_plain_name(rigged):
    plain = rigged.prepare("Chancellor Angela Merkel visited Berlin")
    text = "Chancellor Ange\u00adla Mer\u00adkel visited Ber\u00adlin"
    marked = rigged.prepare(text)
    assert [[t.text for t in c] for c in marked.windows] == [
        ["Chancellor", "Ange\u00adla", "Mer\u00adkel", "visited", "Ber\u00adlin"]
    ]
    assert all(text[t.start : t.end] == t.text for c in marked.windows for t in c)
    assert marked.encoded == plain.encoded


def test_empty_and_blank_texts_have_no_entities(rigged, rnd):
    for tagger in (rigged, rnd):
        assert tagger.tag(["", "   ", "\n\t"]) == [[], [], []]
    assert rigged.tag([]) == []


def test_results_follow_input_order(rigged):
    texts = ["Paris", "nothing", "Peter", "", "Peter and Paris", "to the Paris"]
    results = rigged.tag(texts)
    assert [[e.text for e in r] for r in results] == [
        ["Paris"], [], ["Peter"], [], ["Peter", "Paris"], ["Paris"],
    ]  # fmt: skip
    # The same texts alone give the same entities as in a batch.
    for text, batched in zip(texts, results, strict=True):
        assert rigged.tag([text])[0] == batched


def test_a_sentence_longer_than_max_chunk_tokens_is_chunked_and_tagged_whole():
    tagger = make_tagger("rigged", max_chunk_tokens=8, max_pass_tokens=32)
    words = ["Peter" if i % 5 == 0 else "went" for i in range(100)]
    text = " ".join(words)  # one sentence of 100 tokens
    prepared = tagger.prepare(text)
    assert len(prepared.windows) >= 100 // 8
    assert all(len(c) <= 8 for c in prepared.windows)
    assert prepared.num_tokens == 100
    [entities] = tagger.tag([text])
    assert_offsets_valid(text, entities)
    assert [e.start for e in entities] == [i for i in range(len(text)) if text[i] == "P"]


def test_tag_prepared_runs_bucketed_batches_within_the_token_budget():
    tagger = make_tagger("random", max_chunk_tokens=16, max_pass_tokens=64)
    lengths = [1, 3, 5, 8, 9, 12, 16, 2, 7, 15, 4, 11]
    texts = [" ".join(["went"] * n) for n in lengths]
    docs = [tagger.prepare(t) for t in texts]
    results, stats = tagger.tag_prepared(docs)
    assert len(results) == len(texts)
    assert stats.real_tokens == sum(lengths)
    assert sum(stats.sequences) == len(texts)  # every sentence ran exactly once
    for (rows, t), n in zip(stats.batches, stats.sequences, strict=True):
        assert t in tagger.options.buckets  # padded to a bucket length
        assert n <= rows and rows * t <= 64  # padded rows included, within the budget
    assert stats.padded_tokens == sum(n * t for n, t in stats.batches)
    assert stats.padded_tokens >= stats.real_tokens
    # Each sentence sits in the smallest bucket that holds it, so padding stays small.
    expected = sorted(bucket_length(n, tagger.options.buckets) for n in lengths)
    got = sorted(t for (_, t), n in zip(stats.batches, stats.sequences, strict=True)
                 for _ in range(n))  # fmt: skip
    assert got == expected


@pytest.mark.parametrize("budget", [64, 256, 1000, 8192])
def test_batch_stats_report_the_tensors_the_network_is_given(budget):
    """The padding metrics are computed from `BatchStats.batches`: it must be the true shape of
    every forward pass, the empty rows that round a pass up to a multiple of 8 included, and no
    pass may hold more padded positions than the budget."""
    tagger = make_tagger("random", max_chunk_tokens=48, max_pass_tokens=budget)
    seen: list[tuple[int, int]] = []
    run_here = tagger.local

    def spy(batches, rows):
        seen.extend(tuple(b.words.shape) for b in batches)
        return run_here(batches, rows)

    tagger.use_runner(spy)
    rng = random.Random(budget)
    texts = [" ".join(["went"] * rng.randint(1, 48)) for _ in range(150)]
    _, stats = tagger.tag_prepared([tagger.prepare(t) for t in texts])
    assert stats.batches == seen
    assert all(rows * t <= budget for rows, t in seen)
    assert stats.padded_tokens == sum(rows * t for rows, t in seen)


def test_submit_mixes_windows_of_several_documents_in_window_order(rigged):
    a = rigged.prepare("Peter went . Paris went .")
    b = rigged.prepare("to Paris .")
    per_window, _ = rigged.submit([(a, 1), (b, 0), (a, 0)]).result()
    assert [[e.text for e in ents] for ents in per_window] == [["Paris"], ["Paris"], ["Peter"]]
    assert per_window[0][0].start == a.text.index("Paris")


def test_options_are_checked():
    with pytest.raises(ValueError):
        TaggerOptions(max_chunk_tokens=0)
    with pytest.raises(ValueError):
        TaggerOptions(max_chunk_tokens=64, max_pass_tokens=32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_cuda_is_a_configuration_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        Tagger(random_model(), TaggerOptions(device="cuda"))
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0")
    assert resolve_device("auto").type == "cpu"


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entities_equal_span_decoding_of_every_tag_of_the_sentence(seed):
    # Random weights give plentiful, often ill-formed tag sequences: the tagger's decoding of
    # only the non-O tags must give what the lenient rules give on the whole sequence.
    tagger = Tagger(random_model(seed), TaggerOptions(device="cpu"))
    texts = [
        "Peter and Paris met Peter in Paris , then Paris , Peter , went home .",
        "Paris Paris Paris . Peter ? Nobody knows where Peter went to .",
        "A very plain sentence with nothing in it at all except Peter .",
    ]
    docs = [tagger.prepare(t) for t in texts]
    got, _ = tagger.tag_prepared(docs)
    for doc, entities in zip(docs, got, strict=True):
        expected = []
        for chunk, enc in zip(doc.windows, doc.encoded, strict=True):
            with torch.inference_mode():
                tags, scores = tagger.model.decode(pad_batch([enc]))
            names = [tagger.vocabs.tags.itos[i] for i in tags[0].tolist()]
            for span in spans_from_tags(names, tagger.scheme):
                start, end = chunk[span.start].start, chunk[span.end - 1].end
                score = scores[0, span.start : span.end].mean().item()
                expected.append((start, end, span.type, score))
        assert [(e.start, e.end, e.type) for e in entities] == [x[:3] for x in expected]
        for e, x in zip(entities, expected, strict=True):
            assert e.score == pytest.approx(x[3], abs=1e-5)


def test_tag_prepared_gives_each_document_its_own_entities_even_when_one_is_passed_twice():
    """Results are mapped back by position, not by object identity."""
    tagger = make_tagger("rigged")
    d = tagger.prepare("Peter went to Paris .")
    out, _ = tagger.tag_prepared([d, d])
    assert [[e.text for e in x] for x in out] == [["Peter", "Paris"], ["Peter", "Paris"]]


def test_a_document_prepared_by_another_model_is_encoded_again_before_it_is_tagged():
    """After a model swap, documents prepared with the old model's vocabularies are tagged by the
    new one: its own word ids, not the old ones, reach its network."""
    old = make_tagger("rigged")
    new = Tagger(rigged_model(WORDS[:2] + WORDS[:1:-1], version="0.0.2"), old.options)
    text = "Peter went to Paris ."
    prepared = old.prepare(text)
    assert prepared.encoded != new.prepare(text).encoded  # the ids do differ
    (entities,), _ = new.tag_prepared([prepared])
    assert [(e.text, e.type) for e in entities] == [("Peter", "PER"), ("Paris", "LOC")]
    assert prepared.encoded == new.prepare(text).encoded
    assert prepared.vocabs is new.vocabs
