"""Legal Kafka records that other clients can write and that a worker must survive: batches
compressed with any codec, a null key with a null value, a null header value, a JSON number no
double can hold, a value over --max-doc-bytes, a document whose output is over the producer's
request limit.

Each test writes ONE such record, then ONE normal document on the same (single) partition, to a
real `ner-stream run` worker with the packaged English model, and checks what a user sees: the
normal document is tagged, every input offset has exactly one output or one dead letter (with its
reason), the worker is still running, and the group's committed offset reaches the end of the
partition (so a restart does not meet the same record again).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from kafka import KafkaProducer

from ner_stream.messages import record_size
from tests import kafka_util
from tests.integration import worker_util as wu
from tests.integration.worker_util import Topics

pytestmark = pytest.mark.integration

# Generous bounds on a busy 2-core machine: start-up imports torch and loads the model.
START_AND_OUTPUT_TIMEOUT_S = 120
COMMIT_TIMEOUT_S = 30
# The ~900 kB document of the output-too-large case takes the tagger 15-30 s on 2 cores.
LONG_DOC_TIMEOUT_S = 300

# The record that follows each hostile one: it must still be tagged.
OK_KEY = b"ok-1"
OK_VALUE = json.dumps({"id": "ok-1", "text": "Angela Merkel visited Paris."}).encode()
OK_HEADERS = [("trace-id", b"t-ok-1")]

# Marks a null key, value or header value in the lines given to Kafka's console producer.
NULL = "~NULL~"

# A bounded dead letter carries at most this much of the original value (README, "Sizes"), and
# no record may exceed a topic's default max.message.bytes.
DEAD_LETTER_MAX_BYTES = 64 * 1024
TOPIC_DEFAULT_MAX_BYTES = 1_048_588

WORKER_DEFAULT_MAX_DOC_BYTES = 1_048_576


@dataclass
class Outcome:
    """What the worker made of the input partition: per input offset, its output or dead letter."""

    end: int
    outputs: dict[int, wu.Record]
    dead: dict[int, wu.Record]


@pytest.fixture
def make_topics(topic_factory) -> Callable[..., Topics]:
    def make(input_configs: dict[str, str] | None = None) -> Topics:
        return Topics(
            input=topic_factory(partitions=1, prefix="hostile", configs=input_configs),
            output=topic_factory(partitions=1, prefix="hostile-ents"),
            dlq=topic_factory(partitions=1, prefix="hostile-dlq"),
            group=kafka_util.unique_name("hostile-group"),
        )

    return make


@pytest.fixture
def start_worker(kafka_bootstrap, tmp_path) -> Iterator[Callable[[Topics], wu.WorkerProcess]]:
    """``start(topics)``: `ner-stream run` with the packaged model and default limits (1 MiB
    --max-doc-bytes); SIGKILLed (by pid) at teardown if it still runs."""
    started: list[wu.WorkerProcess] = []

    def start(topics: Topics) -> wu.WorkerProcess:
        args = [
            "--bootstrap-servers", kafka_bootstrap,
            "--input-topic", topics.input,
            "--output-topic", topics.output,
            "--dlq-topic", topics.dlq,
            "--group-id", topics.group,
            "--device", "cpu",
            "--metrics-port", "0",
            "--commit-interval-ms", "200",
            "--session-timeout-ms", "10000",
            "--connect-timeout-s", "20",
        ]  # fmt: skip
        worker = wu.WorkerProcess("hostile", args, tmp_path / "worker.log").start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def _produce_ok(bootstrap: str, topic: str) -> wu.Produced:
    (produced,) = wu.produce_records(bootstrap, topic, [(OK_KEY, OK_VALUE, OK_HEADERS)])
    return produced


def _read_input(bootstrap: str, topic: str) -> list[wu.Record]:
    with wu.TopicReader(bootstrap, topic) as reader:
        return reader.read_to_end()


def _strict_json(value: bytes) -> dict:
    """Parse an output as standard JSON: NaN and Infinity are not JSON."""

    def reject(constant: str):
        raise AssertionError(f"the output is not valid JSON: it holds {constant}")

    return json.loads(value.decode("utf-8"), parse_constant=reject)


def _process(
    bootstrap: str,
    topics: Topics,
    worker: wu.WorkerProcess,
    timeout_s: float = START_AND_OUTPUT_TIMEOUT_S,
) -> Outcome:
    """Wait until every input offset has an output or a dead letter and the group has committed
    the end of the partition, failing at once (with the worker's log) if the worker exits."""
    (end,) = wu.end_offsets(bootstrap, topics.input, 1).values()

    def committed() -> None:
        wu.wait_for(
            lambda: wu.committed_offsets(bootstrap, topics.group, topics.input, 1) == {0: end},
            COMMIT_TIMEOUT_S,
            lambda: (
                f"the committed offset to reach {end} "
                f"(now {wu.committed_offsets(bootstrap, topics.group, topics.input, 1)})"
            ),
            [worker],
            interval_s=0.3,
        )
        assert worker.alive(), f"the worker exited; log:\n{worker.tail()}"

    outputs, dead = wu.read_results(
        bootstrap,
        topics,
        lambda out, dlq: len(out.records) + len(dlq.records) >= end,
        timeout_s,
        lambda out, dlq: (
            f"an output or dead letter for each of {end} input records "
            f"({len(out.records)} outputs, {len(dlq.records)} dead letters)"
        ),
        [worker],
        then=committed,
    )

    outcome = Outcome(end, {}, {})
    seen: dict[int, list[str]] = {}
    for record in outputs:
        source = _strict_json(record.value)["source"]
        assert (source["topic"], source["partition"]) == (topics.input, 0), source
        seen.setdefault(source["offset"], []).append("output")
        outcome.outputs[source["offset"]] = record
    for record in dead:
        headers = dict(record.headers)
        assert headers["ner_stream.source.topic"] == topics.input.encode()
        assert headers["ner_stream.source.partition"] == b"0"
        offset = int(headers["ner_stream.source.offset"])
        seen.setdefault(offset, []).append(f"dead letter {headers['ner_stream.reason']!r}")
        outcome.dead[offset] = record
    assert {o: len(kinds) for o, kinds in seen.items()} == dict.fromkeys(range(end), 1), (
        f"each of the {end} input offsets needs exactly one output or dead letter: {seen}"
    )
    return outcome


def _check_ok_tagged(outcome: Outcome, ok: wu.Produced) -> None:
    """The normal document written after the hostile record has its output, with its entities."""
    assert ok.offset in outcome.outputs, f"no output for the normal document at {ok.offset}"
    record = outcome.outputs[ok.offset]
    out = _strict_json(record.value)
    assert out["id"] == "ok-1"
    assert record.key == OK_KEY
    assert record.headers == OK_HEADERS
    found = {(e["text"], e["type"]) for e in out["entities"]}
    assert ("Angela Merkel", "PER") in found, out["entities"]


def _check_bounded_dead_letter(
    letter: wu.Record, original: wu.Produced, reason: str, truncated: bool
) -> None:
    """A dead letter within the dead-letter topic's limit that says how to find the original:
    the original whole when it fits (`truncated` False), else a prefix of it."""
    assert original.value is not None
    headers = dict(letter.headers)
    assert headers["ner_stream.reason"] == reason.encode(), headers
    assert letter.key == original.key
    for name, value in original.headers:
        assert headers[name] == value, f"the original header {name!r} must be kept"
    assert letter.value is not None
    assert record_size(letter.key, letter.value, letter.headers) <= TOPIC_DEFAULT_MAX_BYTES
    if truncated:
        assert headers["ner_stream.truncated"] == b"true"
        assert 0 < len(letter.value) <= DEAD_LETTER_MAX_BYTES, len(letter.value)
        assert original.value.startswith(letter.value), "the dead letter carries a prefix"
    else:
        assert "ner_stream.truncated" not in headers
        assert letter.value == original.value
    assert headers["ner_stream.original.size"] == str(len(original.value)).encode()
    sha256 = hashlib.sha256(original.value).hexdigest()
    assert headers["ner_stream.original.sha256"] == sha256.encode()
    assert headers["ner_stream.source.offset"] == str(original.offset).encode()


# ------------------------------------------------------------------------------ 1. codecs


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy", "gzip"])
def test_batch_compressed_by_the_java_client_is_tagged(
    codec, kafka_bootstrap, make_topics, start_worker
):
    topics = make_topics()
    worker = start_worker(topics)
    doc = {"id": f"{codec}-1", "text": "Oskar Lund visited Malmo."}
    kafka_util.console_produce(
        kafka_bootstrap,
        topics.input,
        [f"trace-id:t-{codec}\t{codec}-1\t{json.dumps(doc)}"],
        compression=codec,
        reader_properties={"parse.key": "true", "parse.headers": "true"},
    )
    ok = _produce_ok(kafka_bootstrap, topics.input)

    outcome = _process(kafka_bootstrap, topics, worker)

    assert outcome.dead == {}, "a compressed batch is not bad input"
    _check_ok_tagged(outcome, ok)
    record = outcome.outputs[0]
    out = _strict_json(record.value)
    assert out["id"] == f"{codec}-1"
    assert record.key == f"{codec}-1".encode()
    assert record.headers == [("trace-id", f"t-{codec}".encode())]
    assert ("Oskar Lund", "PER") in {(e["text"], e["type"]) for e in out["entities"]}


# ------------------------------------------------------------------------------ 2. null key+value


def test_null_key_and_null_value_is_dead_lettered_as_missing_text(
    kafka_bootstrap, make_topics, start_worker
):
    topics = make_topics()
    worker = start_worker(topics)
    # kafka-python refuses to send a record with neither key nor value; Kafka's own client does not.
    kafka_util.console_produce(
        kafka_bootstrap,
        topics.input,
        [f"{NULL}\t{NULL}"],
        reader_properties={"parse.key": "true", "null.marker": NULL},
    )
    (written,) = _read_input(kafka_bootstrap, topics.input)
    assert (written.key, written.value, written.headers) == (None, None, [])
    ok = _produce_ok(kafka_bootstrap, topics.input)

    outcome = _process(kafka_bootstrap, topics, worker)

    letter = outcome.dead[0]
    assert dict(letter.headers)["ner_stream.reason"] == b"missing_text"
    # The original carried nothing; kafka-python cannot write a record with neither key nor value
    # either, so the dead letter may hold an empty value (or key) in place of the null.
    assert not letter.key and not letter.value, (letter.key, letter.value)
    _check_ok_tagged(outcome, ok)


# ------------------------------------------------------------------------------ 3. null header


def test_null_header_value_is_carried_to_the_output(kafka_bootstrap, make_topics, start_worker):
    topics = make_topics()
    worker = start_worker(topics)
    doc = {"id": "h-1", "text": "Oskar Lund visited Malmo."}
    kafka_util.console_produce(
        kafka_bootstrap,
        topics.input,
        [f"trace-id:t-h-1,nothing:{NULL}\th-1\t{json.dumps(doc)}"],
        reader_properties={"parse.key": "true", "parse.headers": "true", "null.marker": NULL},
    )
    (written,) = _read_input(kafka_bootstrap, topics.input)
    assert written.headers == [("trace-id", b"t-h-1"), ("nothing", None)], "a null header value"
    ok = _produce_ok(kafka_bootstrap, topics.input)

    outcome = _process(kafka_bootstrap, topics, worker)

    assert outcome.dead == {}
    record = outcome.outputs[0]
    out = _strict_json(record.value)
    assert out["id"] == "h-1"
    assert out["entities"], "the document is tagged"
    assert record.key == b"h-1"
    headers = dict(record.headers)
    assert headers["trace-id"] == b"t-h-1"
    assert "nothing" in headers, "the header with a null value is carried by name"
    _check_ok_tagged(outcome, ok)


# ------------------------------------------------------------------------------ 4. 1e309


def test_number_out_of_double_range_passes_through_as_its_literal(
    kafka_bootstrap, make_topics, start_worker
):
    topics = make_topics()
    worker = start_worker(topics)
    value = b'{"id":"x","text":"Oskar Lund visited Malmo.","weight":1e309}'
    (written,) = wu.produce_records(kafka_bootstrap, topics.input, [(b"x", value, [])])
    ok = _produce_ok(kafka_bootstrap, topics.input)

    outcome = _process(kafka_bootstrap, topics, worker)

    assert outcome.dead == {}, "a number a double cannot hold is still JSON"
    out = _strict_json(outcome.outputs[written.offset].value)
    assert out["id"] == "x"
    assert ("Oskar Lund", "PER") in {(e["text"], e["type"]) for e in out["entities"]}
    assert out["meta"] == {"weight": "1e309"}, "passed through as the string of its literal"
    _check_ok_tagged(outcome, ok)


# ------------------------------------------------------------------------------ 5. too large


def test_value_over_max_doc_bytes_on_a_topic_that_allows_it_is_a_bounded_dead_letter(
    kafka_bootstrap, make_topics, start_worker
):
    topics = make_topics(input_configs={"max.message.bytes": str(5 * 1024 * 1024)})
    worker = start_worker(topics)
    head = b'{"id": "big-in", "text": "'
    tail = b'"}'
    size = 2_000_000  # over the worker's 1 MiB --max-doc-bytes, under the topic's 5 MiB
    value = head + b"Anna Berg visited Oslo. " * ((size - len(head) - len(tail)) // 24)
    value += b" " * (size - len(value) - len(tail)) + tail
    assert len(value) == size
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        acks="all",
        max_request_size=5 * 1024 * 1024,
        request_timeout_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS * 3,
        max_block_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS,
    )
    try:
        (big,) = wu.produce_records(
            kafka_bootstrap,
            topics.input,
            [(b"big-in", value, [("trace-id", b"t-big-in")])],
            producer=producer,
        )
    finally:
        producer.close(timeout=10)
    ok = _produce_ok(kafka_bootstrap, topics.input)

    outcome = _process(kafka_bootstrap, topics, worker)

    _check_bounded_dead_letter(outcome.dead[big.offset], big, "too_large", truncated=True)
    _check_ok_tagged(outcome, ok)


# ------------------------------------------------------------------------------ 6. huge output

_FIRST = ["Anna", "Erik", "Maria", "Lars", "Ingrid", "Johan", "Karin", "Nils", "Sofia", "Per"]
_LAST = ["Berg", "Lund", "Holm", "Dahl", "Strand", "Nygaard", "Sund", "Vik", "Moe", "Eklund"]
_ORGS = ["Volvo", "Ericsson", "Nokia", "Statoil", "Saab", "Ikea", "Maersk", "Carlsberg"]
_CITIES = ["Oslo", "Stockholm", "Copenhagen", "Helsinki", "Bergen", "Gothenburg", "Malmo"]


def _crowded_text(sentences: int) -> str:
    """Short sentences, each naming a person, a company and a city: entities all the way."""
    return "".join(
        f"{_FIRST[i % 10]} {_LAST[(i // 10) % 10]} of {_ORGS[i % 8]} visited "
        f"{_CITIES[i % 7]} on day {i}. "
        for i in range(sentences)
    )


def test_document_whose_output_exceeds_the_request_limit_is_a_bounded_dead_letter(
    kafka_bootstrap, make_topics, start_worker
):
    topics = make_topics()
    worker = start_worker(topics)
    value = json.dumps({"id": "crowded", "text": _crowded_text(18_000)}).encode()
    # Valid and under --max-doc-bytes (and the topic's default limit), but its entities, some
    # 50,000 of them, make an output of several MB.
    assert 800_000 < len(value) < WORKER_DEFAULT_MAX_DOC_BYTES - 50_000, len(value)
    (crowded,) = wu.produce_records(
        kafka_bootstrap, topics.input, [(b"crowded", value, [("trace-id", b"t-crowded")])]
    )
    ok = _produce_ok(kafka_bootstrap, topics.input)

    outcome = _process(kafka_bootstrap, topics, worker, timeout_s=LONG_DOC_TIMEOUT_S)

    # The 900 kB input fits in the dead-letter topic: it is carried whole, to be sent again.
    _check_bounded_dead_letter(outcome.dead[crowded.offset], crowded, "output_too_large",
                               truncated=False)  # fmt: skip
    _check_ok_tagged(outcome, ok)
