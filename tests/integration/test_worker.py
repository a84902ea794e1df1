"""End-to-end tests of `ner-stream run` against a real broker, with the worker as a subprocess.

The model is a tiny random-weight file built once per session: its predictions are arbitrary, and
the tests check the contract around them (one output per document, offsets and keys and headers
carried, dead letters, commits, exit codes), not their quality.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ner_stream.model_process import CRASH_WORD_ENV
from tests import kafka_util
from tests.integration import worker_util as wu
from tests.integration.worker_util import Topics

pytestmark = pytest.mark.integration

PARTITIONS = 4
# Bound on a graceful stop, passed to every worker; a SIGTERM must end the process within it.
SHUTDOWN_TIMEOUT_S = 10.0
# Generous bounds for each waiting phase on a busy 2-core machine; a healthy run needs far less.
START_TIMEOUT_S = 60  # import torch, load the model, join the group
OUTPUT_TIMEOUT_S = 60
# The worker's consumer has kafka-python 3's default session timeout of 45 s: after a SIGKILL the
# group waits that long for the dead member before it gives its partitions to the restarted one.
REJOIN_TIMEOUT_S = 75
ENTITY_TYPES = {"PER", "LOC", "ORG", "MISC"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return wu.build_tiny_model(tmp_path_factory.mktemp("model") / "tiny.nerm")


@pytest.fixture
def make_topics(topic_factory) -> Callable[..., Topics]:
    def make(partitions: int = PARTITIONS) -> Topics:
        return Topics(
            input=topic_factory(partitions=partitions, prefix="docs"),
            output=topic_factory(partitions=partitions, prefix="ents"),
            dlq=topic_factory(partitions=1, prefix="dlq"),
            group=kafka_util.unique_name("ner-group"),
        )

    return make


@pytest.fixture
def start_worker(
    kafka_bootstrap, tiny_model, tmp_path
) -> Iterator[Callable[..., wu.WorkerProcess]]:
    """``start(name, topics, env=None, **flags)``: start `ner-stream run` with test-friendly
    settings.

    Flags are given as keyword arguments (``max_doc_bytes=2048``); ``None`` drops a default flag
    and ``True`` passes a bare switch; `env` adds environment variables. Every worker started here
    is SIGKILLed (by pid) at teardown if it still runs.
    """
    started: list[wu.WorkerProcess] = []

    def start(
        name: str, topics: Topics | None = None, env: dict[str, str] | None = None, **flags
    ) -> wu.WorkerProcess:
        settings: dict = {
            "bootstrap_servers": kafka_bootstrap,
            "model": str(tiny_model),
            "device": "cpu",
            "metrics_port": 0,
            "commit_interval_ms": 200,
            # A killed worker's partitions move on after this long (the default is 45 s).
            "session_timeout_ms": 10000,
            "shutdown_timeout_s": SHUTDOWN_TIMEOUT_S,
            "connect_timeout_s": 20,
            "max_chunk_tokens": 16,
            "log_level": "INFO",
        }
        if topics is not None:
            settings.update(
                input_topic=topics.input,
                output_topic=topics.output,
                dlq_topic=topics.dlq,
                group_id=topics.group,
            )
        settings.update(flags)
        args: list[str] = []
        for key, value in settings.items():
            if value is None:
                continue
            args.append("--" + key.replace("_", "-"))
            if value is not True:
                args.append(str(value))
        log_path = tmp_path / f"worker-{name}.log"
        worker = wu.WorkerProcess(name, args, log_path, env=dict(env or {})).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def _ids(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def _wait_assigned(worker: wu.WorkerProcess, timeout_s: float = START_TIMEOUT_S) -> set[int]:
    """Wait for the worker's first non-empty partition assignment and return it."""
    wu.wait_for(
        lambda: bool(worker.assigned()), timeout_s, f"{worker.name} to get partitions", [worker]
    )
    return worker.assigned() or set()


def _wait_for_ids(
    reader: wu.TopicReader,
    ids: list[str],
    workers: list[wu.WorkerProcess],
    timeout_s: float = OUTPUT_TIMEOUT_S,
    what: str = "every id",
) -> None:
    """Wait until the output reader has seen every one of `ids` (while `workers` keep running)."""
    wu.wait_for(
        lambda: len(reader.ids) >= len(ids),
        timeout_s,
        wu.ids_progress(reader, ids, what),
        workers,
        tick=reader.poll,
    )


def _stop(worker: wu.WorkerProcess) -> float:
    """SIGTERM the worker; assert it exits 0 within the shutdown timeout; return the seconds."""
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(SHUTDOWN_TIMEOUT_S + 20)
    elapsed = time.monotonic() - t0
    assert code == 0, f"worker {worker.name} exited {code} on SIGTERM; log:\n{worker.tail()}"
    assert elapsed <= SHUTDOWN_TIMEOUT_S, f"SIGTERM took {elapsed:.1f}s"
    return elapsed


def _check_output(record: wu.Record, produced: wu.Produced, input_topic: str) -> dict:
    """The contract of one output record against the input record it came from."""
    out = record.json()
    doc = json.loads(produced.value.decode("utf-8"))
    assert out["id"] == doc["id"]
    assert record.key == produced.key, "the output must be keyed like the input"
    assert record.headers == list(produced.headers), "the output must carry the input headers"
    assert out["source"] == {
        "topic": input_topic,
        "partition": produced.partition,
        "offset": produced.offset,
    }
    assert out["model"] == {"name": "tiny-random", "version": "0.0.1"}
    extra = {k: v for k, v in doc.items() if k not in ("id", "text")}
    assert out.get("meta") == (extra or None)
    text = doc["text"]
    for e in out["entities"]:
        assert 0 <= e["start"] < e["end"] <= len(text), e
        assert text[e["start"] : e["end"]] == e["text"], (text, e)
        assert e["type"] in ENTITY_TYPES
        assert 0.0 <= e["score"] <= 1.0
    if not text.strip():
        assert out["entities"] == []
    return out


def _duplicates(outputs: dict[str, list[wu.Record]]) -> int:
    return sum(len(records) - 1 for records in outputs.values())


# ---------------------------------------------------------------------------------------- (a)


def test_clean_run_gives_exactly_one_correct_output_per_document(
    kafka_bootstrap, make_topics, start_worker
):
    topics = make_topics()
    ids = _ids(2000)
    produced = wu.produce_records(kafka_bootstrap, topics.input, wu.doc_records(ids))
    assert {p.partition for p in produced} == set(range(PARTITIONS))
    worker = start_worker("a", topics)
    with wu.TopicReader(kafka_bootstrap, topics.output, json_ids=True) as reader:
        _wait_for_ids(reader, ids, [worker])
        _stop(worker)
        records = reader.read_to_end()

    outputs = wu.outputs_by_id(records)
    assert set(outputs) == set(ids)
    assert _duplicates(outputs) == 0, "a clean run must give exactly one output per document"
    entities = non_ascii = 0
    for doc_id, p in zip(ids, produced, strict=True):
        out = _check_output(outputs[doc_id][0], p, topics.input)
        entities += len(out["entities"])
        non_ascii += sum(1 for e in out["entities"] if not e["text"].isascii())
    # Random weights still tag plenty of tokens, so the span checks above did check something.
    assert entities > 1000 and non_ascii > 50, (entities, non_ascii)


# ---------------------------------------------------------------------------------------- (b)


def test_sigkill_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap, make_topics, start_worker, record_property
):
    topics = make_topics()
    ids = _ids(2000)
    first = start_worker("b1", topics)
    _wait_assigned(first)
    # A stream, not a bulk load: the worker is busy with it when it is killed.
    feeder = wu.BackgroundProducer(kafka_bootstrap, topics.input, wu.doc_records(ids), 400)
    feeder.start()
    with wu.TopicReader(kafka_bootstrap, topics.output, json_ids=True) as reader:
        wu.wait_for(
            lambda: len(reader.ids) >= 300,
            OUTPUT_TIMEOUT_S,
            "some outputs",
            [first],
            tick=reader.poll,
        )
        first.kill()  # SIGKILL: no flush, no commit, no leaving the group
        assert first.proc.returncode == -signal.SIGKILL
        reader.poll(0)
        outputs_at_kill = sum(reader.ids.values())
        assert outputs_at_kill < len(ids), "the kill came too late to be mid-stream"

        second = start_worker("b2", topics)
        produced = feeder.result()
        _wait_for_ids(
            reader, ids, [second], REJOIN_TIMEOUT_S + OUTPUT_TIMEOUT_S, "every id after the restart"
        )
        _stop(second)
        records = reader.read_to_end()

    outputs = wu.outputs_by_id(records)
    missing = set(ids) - set(outputs)
    assert not missing, f"{len(missing)} documents lost, e.g. {sorted(missing)[:5]}"
    duplicates = _duplicates(outputs)
    record_property("outputs_before_kill", outputs_at_kill)
    record_property("duplicates_after_sigkill", duplicates)
    print(
        f"\nSIGKILL after {outputs_at_kill} outputs: {duplicates} duplicate outputs after restart"
    )
    # Only work done since the last commit (200 ms apart) can be redone.
    assert duplicates <= outputs_at_kill
    for doc_id, p in zip(ids, produced, strict=True):
        for record in outputs[doc_id]:
            _check_output(record, p, topics.input)


# ---------------------------------------------------------------------------------------- (c)


def test_member_leaving_the_group_hands_over_without_loss(
    kafka_bootstrap, make_topics, start_worker, record_property
):
    topics = make_topics()
    ids = _ids(2000)
    leaver, survivor = start_worker("c1", topics), start_worker("c2", topics)

    def split() -> bool:
        a, b = leaver.assigned(), survivor.assigned()
        return bool(a) and bool(b) and not a & b and a | b == set(range(PARTITIONS))

    wu.wait_for(
        split,
        START_TIMEOUT_S,
        "both workers to share the partitions",
        [leaver, survivor],
        interval_s=0.2,
    )
    first_ids, late_ids = ids[:1600], ids[1600:]
    feeder = wu.BackgroundProducer(kafka_bootstrap, topics.input, wu.doc_records(first_ids), 400)
    feeder.start()
    with wu.TopicReader(kafka_bootstrap, topics.output, json_ids=True) as reader:
        wu.wait_for(
            lambda: len(reader.ids) >= 300,
            OUTPUT_TIMEOUT_S,
            "outputs of both",
            [leaver, survivor],
            tick=reader.poll,
        )
        _stop(leaver)  # leaves the group while documents keep coming
        wu.wait_for(
            lambda: survivor.assigned() == set(range(PARTITIONS)),
            START_TIMEOUT_S,
            "the survivor to own every partition",
            [survivor],
            interval_s=0.2,
        )
        produced = feeder.result()
        # Records written after the leaver is gone, on every partition: only the survivor can
        # have tagged them.
        late = wu.produce_records(kafka_bootstrap, topics.input, wu.doc_records(late_ids))
        assert {p.partition for p in late} == set(range(PARTITIONS))
        _wait_for_ids(reader, ids, [survivor])
        _stop(survivor)
        records = reader.read_to_end()

    outputs = wu.outputs_by_id(records)
    missing = set(ids) - set(outputs)
    assert not missing, f"{len(missing)} documents lost, e.g. {sorted(missing)[:5]}"
    duplicates = _duplicates(outputs)
    record_property("duplicates_after_leave", duplicates)
    print(f"\nmember left mid-stream: {duplicates} duplicate outputs")
    for doc_id, p in zip(ids, produced + late, strict=True):
        for record in outputs[doc_id]:
            _check_output(record, p, topics.input)


# ---------------------------------------------------------------------------------------- (d)

MAX_DOC_BYTES = 2048
BAD_INPUTS: list[tuple[str, bytes | None]] = [
    ("invalid_utf8", b'{"id": "bad", "text": "caf\xe9 au lait"}'),
    ("not_an_object", b'["a", "JSON", "array"]'),
    ("not_an_object", b"42"),
    ("missing_text", b'{"id": "bad-no-text", "title": "no text here"}'),
    ("missing_text", None),  # a tombstone
    ("text_not_string", b'{"id": "bad-number", "text": 42}'),
    ("text_not_string", b'{"id": "bad-list", "text": ["a", "b"]}'),
    ("too_large", json.dumps({"id": "bad-big", "text": "big " * MAX_DOC_BYTES}).encode()),
    ("invalid_json", b'{"id": "bad-json", "text": "never closed'),
    ("invalid_json", b"{not json at all}"),
    ("id_not_string", b'{"id": ["a"], "text": "an id that is a list"}'),
]


def test_bad_inputs_go_to_the_dead_letter_topic_with_reason_and_source(
    kafka_bootstrap, make_topics, start_worker
):
    topics = make_topics(partitions=2)
    good_ids = _ids(80, "good")
    good = wu.doc_records(good_ids)
    # A value that is not JSON at all is a valid plain-text document; its id is its key.
    good.append((b"plain-1", "Plain text about Paris, not JSON ✓".encode(), [("h", b"1")]))
    good_ids.append("plain-1")
    bad = [
        (f"bad-{n}".encode(), value, [("trace-id", f"bad-{n}".encode())])
        for n, (_, value) in enumerate(BAD_INPUTS)
    ]
    # Interleave: one bad record after every 7 good ones.
    records, bad_left = [], list(bad)
    for i, record in enumerate(good):
        records.append(record)
        if i % 7 == 6 and bad_left:
            records.append(bad_left.pop(0))
    records.extend(bad_left)
    produced = wu.produce_records(kafka_bootstrap, topics.input, records)
    by_key = {p.key: p for p in produced}

    worker = start_worker("d", topics, max_doc_bytes=MAX_DOC_BYTES)
    outputs, dead = wu.read_results(
        kafka_bootstrap,
        topics,
        lambda out, dlq: len(out.ids) >= len(good_ids) and len(dlq.records) >= len(bad),
        OUTPUT_TIMEOUT_S,
        "outputs and dead letters",
        [worker],
        then=lambda: _stop(worker),
    )

    by_id = wu.outputs_by_id(outputs)
    assert set(by_id) == set(good_ids), "every valid document, and only those, has an output"
    assert _duplicates(by_id) == 0
    for doc_id in good_ids:
        p = by_key[doc_id.encode()]
        out = by_id[doc_id][0].json()
        assert out["source"] == {
            "topic": topics.input,
            "partition": p.partition,
            "offset": p.offset,
        }
        assert by_id[doc_id][0].key == p.key
        assert by_id[doc_id][0].headers == list(p.headers)

    assert sorted(r.key for r in dead) == sorted(k for k, _, _ in bad), "one dead letter each"
    for record, (reason, value) in zip(bad, BAD_INPUTS, strict=True):
        key = record[0]
        (letter,) = [r for r in dead if r.key == key]
        p = by_key[key]
        assert letter.value == value, f"{reason}: the original bytes must be kept"
        headers = dict(letter.headers)
        assert len(headers) == len(letter.headers), "each header once"
        assert headers["trace-id"] == key, "the original headers must be kept"
        assert headers["ner_stream.reason"] == reason.encode(), (key, headers)
        assert headers["ner_stream.source.topic"] == topics.input.encode()
        assert headers["ner_stream.source.partition"] == str(p.partition).encode()
        assert headers["ner_stream.source.offset"] == str(p.offset).encode()
        assert headers["ner_stream.detail"], "a dead letter says what was wrong"


def test_a_document_that_kills_the_model_process_is_dead_lettered_and_the_stream_goes_on(
    kafka_bootstrap, make_topics, start_worker
):
    topics = make_topics(partitions=1)
    ids = _ids(40)
    killer = "doc-17"
    records = []
    for doc_id in ids:
        # "berlin", a word of the model's vocabulary, only in the document that kills the model.
        text = "Peter went to Berlin ." if doc_id == killer else f"Ada ({doc_id}) in Zürich ."
        records.append((doc_id.encode(), json.dumps({"id": doc_id, "text": text}).encode(), []))
    produced = {p.key: p for p in wu.produce_records(kafka_bootstrap, topics.input, records)}
    worker = start_worker("k", topics, env={CRASH_WORD_ENV: "berlin"})
    found, dead = wu.read_results(
        kafka_bootstrap,
        topics,
        lambda out, dlq: len(out.ids) >= len(ids) - 1 and dlq.records,
        OUTPUT_TIMEOUT_S,
        "the outputs and the dead letter",
        [worker],
        then=lambda: _stop(worker),  # still running, and it stops cleanly
    )
    outputs = wu.outputs_by_id(found)

    assert set(outputs) == set(ids) - {killer}
    assert _duplicates(outputs) == 0
    (letter,) = dead
    assert letter.key == killer.encode()
    headers = dict(letter.headers)
    assert headers["ner_stream.reason"] == b"model_crash"
    assert headers["ner_stream.source.offset"] == str(produced[killer.encode()].offset).encode()
    committed = wu.committed_offsets(kafka_bootstrap, topics.group, topics.input, 1)
    assert committed == wu.end_offsets(kafka_bootstrap, topics.input, 1)
    assert worker.log().count("model process restarted") == 2, worker.tail()


# ---------------------------------------------------------------------------------------- (e)


def test_sigterm_commits_exactly_what_was_output(
    kafka_bootstrap, make_topics, start_worker, record_property
):
    topics = make_topics()
    ids = _ids(1500)
    first = start_worker("e1", topics)
    _wait_assigned(first)
    feeder = wu.BackgroundProducer(kafka_bootstrap, topics.input, wu.doc_records(ids), 500)
    feeder.start()
    with wu.TopicReader(kafka_bootstrap, topics.output, json_ids=True) as reader:
        wu.wait_for(
            lambda: len(reader.ids) >= 300,
            OUTPUT_TIMEOUT_S,
            "some outputs",
            [first],
            tick=reader.poll,
        )
        # Mid-stream: documents are queued, being tagged and in flight to the broker.
        first_stop_s = _stop(first)
        committed = wu.committed_offsets(kafka_bootstrap, topics.group, topics.input, PARTITIONS)
        outputs = reader.read_to_end()
        produced = feeder.result()

        ends = wu.end_offsets(kafka_bootstrap, topics.input, PARTITIONS)
        done = {(r.json()["source"]["partition"], r.json()["source"]["offset"]) for r in outputs}
        assert len(done) == len(outputs), "no duplicates before any restart"
        assert 0 < len(done) < len(ids), "the stop should have come mid-stream"
        for partition, offset in done:
            assert offset < committed.get(partition, 0), (
                f"output for {partition}/{offset} but committed {committed}"
            )
        for p in range(PARTITIONS):
            assert committed.get(p, 0) <= ends[p]
            # No gaps either: every record below the commit has its output.
            below = {(p, o) for o in range(committed.get(p, 0))}
            assert below <= done, f"partition {p}: committed past records without output"

        # The rest, by a second worker on the same group: it resumes exactly at the commits.
        second = start_worker("e2", topics)
        _wait_for_ids(reader, ids, [second])
        second_stop_s = _stop(second)
        records = reader.read_to_end()

    committed = wu.committed_offsets(kafka_bootstrap, topics.group, topics.input, PARTITIONS)
    assert committed == ends, "after processing everything the commits reach the end offsets"
    outputs = wu.outputs_by_id(records)
    assert set(outputs) == set(ids)
    assert _duplicates(outputs) == 0, "a graceful stop leaves nothing to redo"
    for doc_id, p in zip(ids, produced, strict=True):
        _check_output(outputs[doc_id][0], p, topics.input)
    record_property("sigterm_seconds", f"{first_stop_s:.2f}/{second_stop_s:.2f}")
    print(f"\nSIGTERM to exit: {first_stop_s:.2f}s mid-stream, {second_stop_s:.2f}s idle")


# ---------------------------------------------------------------------------------------- (f)


def test_missing_input_topic_exits_2_naming_it(kafka_admin, start_worker):
    missing = kafka_util.unique_name("no-such-topic")
    t0 = time.monotonic()
    worker = start_worker(
        "f-missing",
        input_topic=missing,
        output_topic=missing + "-out",
        dlq_topic=missing + "-dlq",
        group_id=missing,
    )
    code = worker.wait(START_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    log = worker.log()
    assert code == 2, log
    assert f"ner-stream: input topic {missing!r} does not exist" in log, log
    assert "--create-topics" in log
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert missing not in set(kafka_admin.list_topics()), "checking must not create the topic"


def test_create_topics_creates_input_output_and_dead_letter_topics(kafka_admin, start_worker):
    base = kafka_util.unique_name("created")
    names = [base, base + "-out", base + "-dlq"]
    try:
        worker = start_worker(
            "f-create",
            input_topic=names[0],
            output_topic=names[1],
            dlq_topic=names[2],
            group_id=base,
            create_topics=True,
            topic_partitions=2,
        )
        assert _wait_assigned(worker) == {0, 1}
        # kafka-python 3.x names the field "name", 2.x "topic".
        described = {t.get("name", t.get("topic")): t for t in kafka_admin.describe_topics(names)}
        for name in names:
            assert described[name].get("error_code", 0) == 0, described[name]
            assert len(described[name]["partitions"]) == 2, name
        _stop(worker)
    finally:
        existing = set(kafka_admin.list_topics())
        leftovers = [n for n in names if n in existing]
        if leftovers:
            kafka_admin.delete_topics(leftovers)


def test_unreachable_broker_exits_3(start_worker):
    t0 = time.monotonic()
    worker = start_worker(
        "f-unreachable",
        bootstrap_servers="127.0.0.1:1",
        connect_timeout_s=3,
        input_topic="in",
        output_topic="out",
        dlq_topic="dlq",
    )
    code = worker.wait(START_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    log = worker.log()
    assert code == 3, log
    assert "ner-stream: cannot reach Kafka at 127.0.0.1:1 after 3 s" in log, log
    # Start-up (torch, the model) plus the 3 s of retries; nothing like a default 30 s.
    assert elapsed < 30, f"took {elapsed:.1f}s"
