"""The model in a child process: same entities as in-process, passes in flight, failures."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ner_stream.batching import pad_batch
from ner_stream.checkpoint import save
from ner_stream.model_process import ModelProcess, ModelProcessError
from ner_stream.precision import PrecisionCheck, with_check
from ner_stream.tagger import Tagger, TaggerOptions
from tests.fakes import random_model

TEXTS = [
    "Peter went to Paris and the Peter went .",
    "Paris .",
    "",
    "the the the Peter to Paris " * 12,
    "Ünïcödé Peter went to Paris 🇫🇷 .",
]
OPTIONS = TaggerOptions(device="cpu", max_chunk_tokens=32, max_batch_tokens=256)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    loaded = random_model(seed=3)
    path = tmp_path_factory.mktemp("model") / "random.nerm"
    save(path, loaded.model, loaded.info)
    return path


@pytest.fixture(scope="module")
def process(model_file):
    proc = ModelProcess(model_file, OPTIONS, threads=1)
    yield proc
    proc.close()


def test_entities_from_the_model_process_equal_those_of_the_process_itself(model_file, process):
    here = Tagger.from_file(model_file, OPTIONS)
    expected = here.tag(TEXTS * 3)
    remote = Tagger.from_file(model_file, OPTIONS)
    remote.use_runner(process)
    assert remote.tag(TEXTS * 3) == expected
    assert sum(map(len, expected)) > 0


def test_several_passes_in_flight_are_answered_in_order(model_file, process):
    tagger = Tagger.from_file(model_file, OPTIONS)
    docs = [[tagger.prepare(t)] for t in TEXTS]
    expected = [tagger.tag_prepared(d)[0] for d in docs]
    tagger.use_runner(process)
    pending = [tagger.submit([(d[0], c) for c in range(len(d[0].chunks))]) for d in docs]
    # Collected newest first: each waits for the answers ahead of it.
    results = [p.result()[0] for p in reversed(pending)][::-1]
    for got, want, d in zip(results, expected, docs, strict=True):
        assert [e for chunk in got for e in chunk] == want[0], d[0].text
    stats = pending[0].result()[1]
    assert stats.inference_s > 0
    assert stats.real_tokens == docs[0][0].num_tokens


def test_a_model_file_that_cannot_be_loaded_fails_at_start(tmp_path):
    bad = tmp_path / "bad.nerm"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelProcessError, match="could not load the model"):
        ModelProcess(bad, OPTIONS, threads=1)


def test_a_dead_model_process_is_an_error_of_its_own(model_file):
    proc = ModelProcess(model_file, OPTIONS, threads=1)
    tagger = Tagger.from_file(model_file, OPTIONS)
    tagger.use_runner(proc)
    assert tagger.tag(["Peter went to Paris ."]) is not None
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(ModelProcessError, match="stopped"):
        tagger.tag(["Peter went to Paris ."])
    proc.close()


def test_close_stops_the_child(model_file):
    proc = ModelProcess(model_file, OPTIONS, threads=1)
    proc.close()
    assert proc._process.poll() == 0


def test_the_child_exits_when_its_parent_is_gone(model_file):
    proc = ModelProcess(model_file, OPTIONS, threads=1)
    proc._conn.close()  # what the kernel does to the parent's end when the parent dies
    deadline = time.monotonic() + 10
    while proc._process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc._process.poll() == 0


def test_a_pass_that_fails_in_the_child_fails_alone(model_file, process):
    tagger = Tagger.from_file(model_file, OPTIONS)
    tagger.use_runner(process)
    batch = pad_batch([tagger.vocabs.encode(["Peter", "went"])], pad_to=8)
    batch.words[0, 0] = 10**6  # no such word id: the embedding lookup fails
    with pytest.raises(RuntimeError, match="failed on a batch") as failure:
        process([batch], [1]).get()
    assert not isinstance(failure.value, ModelProcessError)
    assert tagger.tag(["Peter went to Paris ."]) == Tagger.from_file(model_file, OPTIONS).tag(
        ["Peter went to Paris ."]
    )


def test_the_model_process_runs_the_precision_it_is_given(tmp_path):
    loaded = random_model(seed=3)
    loaded.info.extra = with_check(
        {}, PrecisionCheck("bf16", 90.0, 90.0, "dev.txt", "ab" * 32, 10, "cpu")
    )
    path = tmp_path / "checked.nerm"
    save(path, loaded.model, loaded.info)
    options = replace(OPTIONS, precision="bf16")
    here = Tagger.from_file(path, options)
    fp32 = Tagger.from_file(path, replace(OPTIONS, precision="fp32")).tag(TEXTS)
    expected = here.tag(TEXTS)
    # bf16 rounds the scores: a pass in the child at fp32 would give those of `fp32`.
    assert [[e.score for e in d] for d in expected] != [[e.score for e in d] for d in fp32]
    proc = ModelProcess(path, options, threads=1)
    try:
        remote = Tagger.from_file(path, options)
        remote.use_runner(proc)
        assert remote.tag(TEXTS) == expected
    finally:
        proc.close()


def test_a_failing_pass_among_passes_in_flight_fails_alone_and_in_its_place(model_file, process):
    # The child runs one pass's network while it decodes the one before: a pass that fails in
    # the network must not overtake, delay or break the answers around it.
    tagger = Tagger.from_file(model_file, OPTIONS)
    good = pad_batch([tagger.vocabs.encode(["Peter", "went", "to", "Paris"])], pad_to=8)
    bad = pad_batch([tagger.vocabs.encode(["Peter", "went"])], pad_to=8)
    bad.words[0, 0] = 10**6
    expected = tagger.run_batches([good], [1])
    replies = [process([b], [1]) for b in (good, bad, good, good)]
    outcomes = []
    for reply in replies:
        try:
            got = reply.get()
            outcomes.append((got.tags.tolist(), got.scores.tolist()))
        except RuntimeError:
            outcomes.append("failed")
    want = (expected[0].tolist(), expected[1].tolist())
    assert outcomes == [want, "failed", want, want]
