"""Hot model swap: when the watched file is loaded (`ChangeDetector`, step by step with a
hand-driven clock); what `ModelSwapper` does with it (a checked candidate waits for the tagging
thread; anything else leaves the model served in place, with one log line and the refused
counter); and the swap in the tagging thread, between micro-batches, with stand-in runners."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from ner_stream.checkpoint import LoadedModel, save
from ner_stream.config import WorkerConfig
from ner_stream.metrics import Metrics
from ner_stream.model_process import ModelProcessError
from ner_stream.model_swap import Candidate, ChangeDetector, ModelSwapper, Served, Signature
from ner_stream.tagger import Tagger, TaggerOptions
from ner_stream.worker import Worker
from tests.fakes import (
    TAGS,
    WORDS,
    FakeConsumer,
    FakeProducer,
    make_tagger,
    random_model,
    rigged_model,
    wait_for,
)

OPTIONS = TaggerOptions(device="cpu", max_chunk_tokens=32, max_pass_tokens=256)
A, B, C = Signature(1, 100, 7), Signature(2, 100, 8), Signature(3, 120, 8)

# ------------------------------------------------------------------------------- ChangeDetector


def test_an_unchanged_file_is_never_loaded_and_polls_come_every_interval():
    d = ChangeDetector(A, interval_s=5.0, now=0.0)
    assert d.wait_s(0.0) == 5.0
    assert d.wait_s(3.0) == 2.0
    for now in (5.0, 10.0, 15.0):
        assert d.wait_s(now) == 0.0
        assert d.poll(A, now) is False
    assert d.wait_s(16.0) == 4.0


def test_a_new_signature_is_loaded_once_a_further_poll_sees_it_unchanged_and_only_once():
    d = ChangeDetector(A, interval_s=5.0, now=0.0)
    assert d.poll(B, 5.0) is False  # first sighting: the file may still be being written
    assert d.poll(B, 10.0) is True
    assert d.current == B
    assert d.poll(B, 15.0) is False
    assert d.poll(B, 20.0) is False


def test_a_file_still_being_written_is_loaded_only_once_it_stops_changing():
    d = ChangeDetector(A, interval_s=1.0, now=0.0)
    growing = [Signature(10 + i, 10 * i, 8) for i in range(1, 5)]
    for i, seen in enumerate(growing):
        assert d.poll(seen, 1.0 + i) is False
    assert d.poll(growing[-1], 5.0) is True


def test_a_missing_file_loads_nothing_and_one_that_comes_back_counts_as_new():
    d = ChangeDetector(A, interval_s=1.0, now=0.0)
    assert d.poll(B, 1.0) is False
    assert d.poll(None, 2.0) is False  # removed between the two looks
    assert d.poll(B, 3.0) is False  # seen again: first sighting once more
    assert d.poll(B, 4.0) is True


def test_going_back_to_the_signature_served_cancels_a_change():
    d = ChangeDetector(A, interval_s=1.0, now=0.0)
    assert d.poll(B, 1.0) is False
    assert d.poll(A, 2.0) is False
    assert d.poll(A, 3.0) is False


def test_check_now_loads_at_once_whatever_the_signature_unless_the_file_is_missing():
    d = ChangeDetector(A, interval_s=5.0, now=0.0)
    assert d.check_now(A, 1.0) is True  # SIGHUP: look again even if nothing seems changed
    assert d.check_now(C, 2.0) is True
    assert d.current == C
    assert d.poll(C, 7.0) is False  # not loaded a second time by the next poll
    assert d.check_now(None, 8.0) is False
    assert d.wait_s(8.0) == 5.0  # a look restarts the interval


def test_interval_zero_never_polls_but_still_answers_check_now():
    d = ChangeDetector(A, interval_s=0.0, now=0.0)
    assert d.wait_s(100.0) is None
    assert d.check_now(B, 100.0) is True
    with pytest.raises(ValueError):
        ChangeDetector(A, interval_s=-1.0, now=0.0)


# -------------------------------------------------------------------------------- ModelSwapper

REVERSED = WORDS[:2] + WORDS[:1:-1]  # the same words, other ids


def write(path: Path, loaded: LoadedModel) -> Path:
    """Replace the model file atomically, as an operator should (checkpoint.save renames)."""
    save(path, loaded.model, loaded.info)
    return path


def replace_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    """What `start_runner` returns for a model run elsewhere: the digest of the file it loaded
    (that of the watched file when it started), a restart and a close."""

    def __init__(self, path: Path) -> None:
        self.digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.closed = 0
        self.restarts = 0

    def restart(self) -> None:
        self.restarts += 1

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def model_file(tmp_path) -> Path:
    return write(tmp_path / "model.nerm", rigged_model())


def swapper_of(path: Path, start_runner=lambda tagger: None, **kwargs) -> ModelSwapper:
    serving = Tagger.from_file(path, OPTIONS)
    kwargs.setdefault("interval_s", 5.0)
    return ModelSwapper(path, serving, Metrics(), start_runner, **kwargs)


def refused(swapper: ModelSwapper) -> float:
    return swapper._metrics.registry.get_sample_value(
        "ner_stream_model_swaps_total", {"result": "refused"}
    )


def test_a_new_version_is_handed_over_after_two_polls_with_its_own_vocabularies(model_file):
    clock = Clock()
    swapper = swapper_of(model_file, clock=clock)
    write(model_file, rigged_model(REVERSED, version="0.0.2"))
    clock.now = 5.0
    swapper.look()
    assert swapper.take() is None, "loaded on its first sighting"
    clock.now = 10.0
    swapper.look()
    candidate = swapper.take()
    assert candidate is not None
    assert (candidate.tagger.name, candidate.tagger.version) == ("rigged", "0.0.2")
    assert candidate.restart is None  # it runs in this process, as the model it replaces
    assert candidate.source == model_file
    assert [[(e.text, e.type) for e in d] for d in candidate.tagger.tag(["Peter in Paris ."])] == [
        [("Peter", "PER"), ("Paris", "LOC")]
    ]
    clock.now = 15.0
    swapper.look()
    assert swapper.take() is None, "the same file handed over twice"
    assert refused(swapper) == 0


def test_sighup_loads_the_file_at_once(model_file):
    swapper = swapper_of(model_file)
    write(model_file, rigged_model(version="0.0.2"))
    swapper.look(now_asked=True)
    candidate = swapper.take()
    assert candidate is not None and candidate.tagger.version == "0.0.2"


def test_a_file_with_the_content_served_is_ignored_silently(model_file, caplog):
    swapper = swapper_of(model_file)
    replace_bytes(model_file, model_file.read_bytes())  # new inode and mtime, same content
    with caplog.at_level(logging.INFO, logger="ner_stream"):
        swapper.look(now_asked=True)
    assert swapper.take() is None
    assert refused(swapper) == 0
    assert caplog.records == []


def test_a_file_replaced_while_it_is_read_is_not_refused_and_the_next_look_takes_it(
    model_file, monkeypatch, caplog
):
    from ner_stream import model_swap

    swapper = swapper_of(model_file)
    real_load = model_swap.load

    def load_then_overwrite(path):
        monkeypatch.setattr(model_swap, "load", real_load)
        replace_bytes(model_file, b"half a file")  # the writer went on meanwhile
        return real_load(path)

    write(model_file, rigged_model(version="0.0.2"))
    monkeypatch.setattr(model_swap, "load", load_then_overwrite)
    with caplog.at_level(logging.INFO, logger="ner_stream"):
        swapper.look(now_asked=True)
    assert swapper.take() is None
    assert refused(swapper) == 0
    assert "changed while it was read: not swapped" in caplog.text
    write(model_file, rigged_model(version="0.0.3"))
    swapper.look()
    swapper.look()
    candidate = swapper.take()
    assert candidate is not None and candidate.tagger.version == "0.0.3"


def _other_types() -> LoadedModel:
    return random_model(tags=[*TAGS, "S-MISC"], name="rigged", version="0.0.2")


def _iob2_with_bioes_tags() -> LoadedModel:
    loaded = rigged_model(version="0.0.2")
    loaded.info.config.tag_scheme = "iob2"  # yet the tags have E- and S- prefixes
    return loaded


REFUSALS = {
    "garbage": (lambda path: replace_bytes(path, b"\x00not a model\xff" * 50), "corrupt"),
    "truncated": (
        lambda path: replace_bytes(path, path.read_bytes()[:2000]),
        "not a readable ner-stream model",
    ),
    "other entity types": (
        lambda path: write(path, _other_types()),
        "its entity types (LOC, MISC, PER) are not those served (LOC, PER); other types need a "
        "redeploy",
    ),
    "same name and version, other content": (
        lambda path: write(path, random_model(name="rigged", version="0.0.1")),
        "named rigged 0.0.1 like the model served but its content differs",
    ),
    "tags not of its scheme": (
        lambda path: write(path, _iob2_with_bioes_tags()),
        "its tag set is not usable: tags not allowed in the iob2 scheme",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_candidate_is_refused_with_one_line_and_counted(case, model_file, caplog):
    swapper = swapper_of(model_file)
    spoil, reason = REFUSALS[case]
    spoil(model_file)
    with caplog.at_level(logging.INFO, logger="ner_stream"):
        swapper.look(now_asked=True)
    assert swapper.take() is None
    assert refused(swapper) == 1
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith(f"model swap refused: {model_file}: ")
    assert reason in message
    assert message.endswith("; still serving rigged 0.0.1")
    # Refused once, not again at every poll; a later good file still gets through.
    swapper.look()
    swapper.look()
    assert refused(swapper) == 1
    write(model_file, rigged_model(version="0.0.3"))
    swapper.look(now_asked=True)
    candidate = swapper.take()
    assert candidate is not None and candidate.tagger.version == "0.0.3"


def test_a_candidate_whose_model_process_cannot_start_is_refused(model_file, caplog):
    def start_runner(tagger):
        raise ModelProcessError("the model process could not load the model: out of memory")

    swapper = swapper_of(model_file, start_runner)
    write(model_file, rigged_model(version="0.0.2"))
    with caplog.at_level(logging.WARNING, logger="ner_stream"):
        swapper.look(now_asked=True)
    assert swapper.take() is None
    assert refused(swapper) == 1
    assert "could not load the model: out of memory; still serving rigged 0.0.1" in caplog.text


class BrokenRunner:
    def __call__(self, batches, rows):
        raise RuntimeError("illegal instruction in the network")


def test_a_candidate_that_fails_its_smoke_tag_is_refused_and_its_process_closed(model_file, caplog):
    processes: list[FakeProcess] = []

    def start_runner(tagger):
        tagger.use_runner(BrokenRunner())
        processes.append(FakeProcess(model_file))
        return processes[-1]

    swapper = swapper_of(model_file, start_runner)
    write(model_file, rigged_model(version="0.0.2"))
    with caplog.at_level(logging.WARNING, logger="ner_stream"):
        swapper.look(now_asked=True)
    assert swapper.take() is None
    assert refused(swapper) == 1
    assert "RuntimeError: illegal instruction in the network" in caplog.text
    assert [p.closed for p in processes] == [1]


def test_a_model_process_that_loaded_a_later_write_is_closed_and_not_refused(model_file, caplog):
    """The file was replaced again between the check and the start of the candidate's model
    process: that process holds another model than the one checked."""
    processes: list[FakeProcess] = []

    def start_runner(tagger):
        write(model_file, rigged_model(version="0.0.3"))
        processes.append(FakeProcess(model_file))
        return processes[-1]

    swapper = swapper_of(model_file, start_runner)
    write(model_file, rigged_model(version="0.0.2"))
    with caplog.at_level(logging.INFO, logger="ner_stream"):
        swapper.look(now_asked=True)
    assert swapper.take() is None
    assert refused(swapper) == 0
    assert [p.closed for p in processes] == [1]
    assert "changed while it was read: not swapped" in caplog.text


def test_the_model_a_swap_replaces_is_closed_once_the_new_one_serves(model_file):
    """A candidate restarts its own model process; the model a swap replaces is closed once the
    new one serves; at shutdown the waiting and the serving ones are closed."""
    processes: list[FakeProcess] = []

    def start_runner(tagger):
        processes.append(FakeProcess(model_file))
        return processes[-1]

    first = FakeProcess(model_file)
    swapper = swapper_of(model_file, start_runner, retire=first.close)
    write(model_file, rigged_model(version="0.0.2"))
    swapper.look(now_asked=True)
    two = swapper.take()
    assert two is not None
    two.restart()
    assert processes[0].restarts == 1 and first.restarts == 0
    assert first.closed == 0
    swapper.served(two)
    assert first.closed == 1 and processes[0].closed == 0

    write(model_file, rigged_model(version="0.0.3"))
    swapper.look(now_asked=True)  # 0.0.3 waits, never taken
    assert len(processes) == 2
    swapper.close()
    assert [p.closed for p in processes] == [1, 1]
    assert first.closed == 1


def test_the_watcher_thread_polls_the_file_and_answers_sighup(model_file):
    polling = swapper_of(model_file, interval_s=0.02).start()
    on_signal = swapper_of(model_file, interval_s=0.0).start()
    try:
        write(model_file, rigged_model(version="0.0.2"))
        candidate = wait_for(polling.take, what="the polled file handed over")
        assert candidate.tagger.version == "0.0.2"
        assert on_signal.take() is None
        on_signal.check_now()
        candidate = wait_for(on_signal.take, what="the file handed over on SIGHUP")
        assert candidate.tagger.version == "0.0.2"
    finally:
        polling.close()
        on_signal.close()


# ------------------------------------------------------------------------ in the tagging thread

CFG = WorkerConfig(
    input_topic="documents", output_topic="entities", dlq_topic="documents.dlq",
    max_batch_docs=4, max_batch_tokens=48, max_pass_tokens=48, max_chunk_tokens=32,
    max_wait_ms=2, commit_interval_ms=10, queue_docs=64, shutdown_timeout_s=5.0, metrics_port=0,
)  # fmt: skip
LONG_SENTENCE = "Peter went to Paris and the ."  # 7 tokens: no other window has as many


class Recording:
    """A runner in this process that records the length of every window it tags."""

    def __init__(self, tagger: Tagger) -> None:
        self.tagger = tagger
        self.lengths: list[int] = []

    def __call__(self, batches, rows):
        for batch, n in zip(batches, rows, strict=True):
            self.lengths.extend(batch.mask[:n].sum(dim=1).tolist())
        return self.tagger.local(batches, rows)


class OneSwap:
    """The tagging stage's `swaps`: hands over `candidate` at the first look where `when()`."""

    def __init__(self, candidate: Candidate, when) -> None:
        self.candidate: Candidate | None = candidate
        self.when = when
        self.served_calls: list[Candidate] = []

    def take(self) -> Candidate | None:
        if self.candidate is None or not self.when():
            return None
        candidate, self.candidate = self.candidate, None
        return candidate

    def served(self, candidate: Candidate) -> None:
        self.served_calls.append(candidate)


def candidate_of(tagger: Tagger, restart=None) -> Candidate:
    served = Served(tagger.name, tagger.version, "digest", frozenset({"PER", "LOC"}))
    return Candidate(tagger, restart, served, Path("new.nerm"))


def run_until_outputs(worker: Worker, consumer: FakeConsumer, producer: FakeProducer, n: int):
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.run(stop)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(producer.delivered(CFG.output_topic)) >= n, timeout=30,
                 what=f"{n} outputs")  # fmt: skip
        wait_for(lambda: consumer.committed_offset(0) == consumer.end_offset(0),
                 what="every offset committed")  # fmt: skip
    finally:
        stop.set()
        thread.join(10)
    assert result == [0]
    return [s.json() for s in producer.delivered(CFG.output_topic)]


def test_a_swap_between_micro_batches_loses_nothing_and_tags_a_long_document_again_whole():
    """Swapped in while a long document is partly tagged by the old model: every document gets
    one output, the outputs switch models once, the long document is tagged again whole by the
    new model, and documents prepared with the old model's vocabularies (other word ids) get the
    new model's right entities."""
    old = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=48)
    new = Tagger(rigged_model(REVERSED, version="0.0.2"), old.options)
    old_runner, new_runner = Recording(old), Recording(new)
    old.use_runner(old_runner)
    new.use_runner(new_runner)
    texts = {f"a{i}": "Paris ." for i in range(5)}
    texts["long"] = " ".join([LONG_SENTENCE] * 12)  # 4 pieces of 3 windows (24 tokens a piece)
    texts.update({f"b{i}": "Peter went to Paris ." for i in range(40)})
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for doc_id, text in texts.items():
        consumer.append(0, json.dumps({"id": doc_id, "text": text}).encode())
    candidate = candidate_of(new)
    swaps = OneSwap(candidate, when=lambda: 7 in old_runner.lengths)
    worker = Worker(CFG, old, consumer, producer, swaps=swaps)

    outputs = run_until_outputs(worker, consumer, producer, len(texts))

    assert sorted(o["id"] for o in outputs) == sorted(texts), "a document lost or tagged twice"
    versions = [o["model"]["version"] for o in outputs]
    switch = versions.index("0.0.2")
    assert switch > 0 and versions == ["0.0.1"] * switch + ["0.0.2"] * (len(versions) - switch)
    assert all(o["model"]["name"] == "rigged" for o in outputs)
    by_id = {o["id"]: o for o in outputs}
    assert by_id["long"]["model"]["version"] == "0.0.2"
    assert old_runner.lengths.count(7) >= 3, "the old model never tagged a piece of it"
    assert new_runner.lengths.count(7) == 12, "the new model did not tag the long document whole"
    reference = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=48)
    for doc_id, text in texts.items():
        (expected,) = reference.tag([text])
        got = [(e["text"], e["type"], e["start"], e["end"]) for e in by_id[doc_id]["entities"]]
        assert got == [(e.text, e.type, e.start, e.end) for e in expected], doc_id
    assert swaps.served_calls == [candidate]
    registry = worker.metrics.registry
    assert registry.get_sample_value("ner_stream_model_swaps_total", {"result": "swapped"}) == 1
    info = {"name": "rigged", "version": "0.0.2", "architecture": "lstm", "device": "cpu",
            "precision": new.precision.precision}  # fmt: skip
    assert registry.get_sample_value("ner_stream_model_info", info) == 1


class DiesOnce:
    """A model process stand-in whose first pass is lost with it; restarted, it tags."""

    def __init__(self, tagger: Tagger) -> None:
        self.tagger = tagger
        self.passes = 0
        self.restarts = 0

    def __call__(self, batches, rows):
        self.passes += 1
        if self.passes > 1:
            return self.tagger.local(batches, rows)

        class Lost:
            def ready(self) -> bool:
                return True

            def get(self):
                raise ModelProcessError("the model process stopped (exit code -9)")

        return Lost()

    def restart(self) -> None:
        self.restarts += 1


def test_after_a_swap_a_model_process_that_dies_is_restarted_with_the_new_model():
    old = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=48)
    new = Tagger(rigged_model(REVERSED, version="0.0.2"), old.options)
    dying = DiesOnce(new)
    new.use_runner(dying)
    old_restarts: list[int] = []
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(10):
        consumer.append(0, json.dumps({"id": f"d{i}", "text": "Peter in Paris ."}).encode())
    swaps = OneSwap(candidate_of(new, dying.restart), when=lambda: True)
    worker = Worker(CFG, old, consumer, producer, swaps=swaps,
                    restart_model=lambda: old_restarts.append(1))  # fmt: skip

    outputs = run_until_outputs(worker, consumer, producer, 10)

    assert dying.restarts == 1 and old_restarts == []
    assert sorted(o["id"] for o in outputs) == [f"d{i}" for i in range(10)]
    assert {o["model"]["version"] for o in outputs} == {"0.0.2"}
    assert all([e["text"] for e in o["entities"]] == ["Peter", "Paris"] for o in outputs)
