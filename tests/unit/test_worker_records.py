"""Records Kafka accepts as legal that must not stop the worker: each ends as exactly one output or
one dead letter, within the size its topic takes, and the documents behind it are tagged.

The loop runs against the in-memory stand-ins of `tests.fakes`, whose producer refuses what
kafka-python refuses (a null key with a null value, a header value that is not bytes, a record
over `max_request_size`) and whose topics can refuse records over a size, as a broker does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from ner_stream.delivery import TIGHT_DEAD_LETTER_BYTES
from ner_stream.kafka_io import SizeLimits
from ner_stream.messages import record_size
from ner_stream.worker import Worker
from tests.fakes import FakeConsumer, FakeProducer, wait_for
from tests.unit.test_worker import (
    CFG,
    DLQ,
    IN,
    OUT,
    Running,
    committed_all,
    doc,
    output_ids,
    outputs,
)
from tests.unit.test_worker import tagger as tagger  # noqa: F401  (the module's fixture)

NORMAL = doc("ok", "Peter went to Paris .")


def run_until_done(tagger, consumer, producer, limits=None, **overrides) -> Running:
    cfg = replace(CFG, **overrides)
    running = Running(Worker(cfg, tagger, consumer, producer, limits=limits))
    wait_for(lambda: committed_all(consumer), what="every offset committed")
    return running


def assert_one_result_per_offset(consumer: FakeConsumer, producer: FakeProducer) -> None:
    """Every input offset has exactly one output or one dead letter."""
    seen: dict[tuple[int, int], int] = {}
    for out in outputs(producer):
        key = (out["source"]["partition"], out["source"]["offset"])
        seen[key] = seen.get(key, 0) + 1
    for dead in producer.delivered(DLQ):
        key = (int(dead.header("ner_stream.source.partition")),
               int(dead.header("ner_stream.source.offset")))  # fmt: skip
        seen[key] = seen.get(key, 0) + 1
    expected = {(p, o) for p in range(len(consumer.logs)) for o in range(consumer.end_offset(p))}
    assert set(seen) == expected
    assert all(n == 1 for n in seen.values()), seen


def test_a_null_key_with_a_null_value_is_dead_lettered_and_the_stream_goes_on(tagger):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    consumer.append(0, None, key=None)
    consumer.append(0, NORMAL)
    running = run_until_done(tagger, consumer, producer)
    assert running.stop() == 0
    dead = producer.delivered(DLQ)[0]
    assert dead.header("ner_stream.reason") == b"missing_text"
    assert dead.header("ner_stream.original.size") == b"-1"  # Kafka's length of a null value
    assert dead.value == b"" and dead.key is None
    assert output_ids(producer) == {"ok"}
    assert_one_result_per_offset(consumer, producer)


def test_a_header_with_a_null_value_is_carried_empty_to_the_output_and_dead_letter(tagger):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    headers = [("trace", b"t1"), ("empty", None), ("trace", b"t2")]
    consumer.append(0, NORMAL, headers=headers)
    consumer.append(0, b"\xff not utf-8", headers=headers)
    running = run_until_done(tagger, consumer, producer)
    assert running.stop() == 0
    out = producer.delivered(OUT)[0]
    assert out.headers == [("trace", b"t1"), ("empty", b""), ("trace", b"t2")]
    dead = producer.delivered(DLQ)[0]
    assert dead.headers[:3] == [("trace", b"t1"), ("empty", b""), ("trace", b"t2")]
    assert dead.header("ner_stream.reason") == b"invalid_utf8"
    assert_one_result_per_offset(consumer, producer)


def test_numbers_a_double_cannot_hold_pass_through_as_their_literal(tagger):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    big_int = "9" * 5000
    value = ('{"id":"x","text":"Peter went to Paris .","weight":1e309,"tiny":-1E-400,'
             f'"count":{big_int},"ok":1.5}}').encode()  # fmt: skip
    consumer.append(0, value)
    running = run_until_done(tagger, consumer, producer)
    assert running.stop() == 0
    (out,) = outputs(producer)
    assert out["meta"] == {"weight": "1e309", "tiny": -0.0, "count": big_int, "ok": 1.5}
    assert [e["text"] for e in out["entities"]] == ["Peter", "Paris"]


def test_pass_through_fields_never_shadow_output_fields(tagger):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    fake = [{"text": "x", "type": "PER", "start": 0, "end": 1, "score": 1.0}]
    consumer.append(0, doc("s", "Peter .", entities=fake, source="mine", model="m", meta={"a": 1}))
    running = run_until_done(tagger, consumer, producer)
    assert running.stop() == 0
    (out,) = outputs(producer)
    assert out["id"] == "s" and out["source"]["topic"] == IN
    assert out["model"]["name"] == "rigged"
    assert [e["text"] for e in out["entities"]] == ["Peter"]
    assert out["meta"] == {"entities": fake, "source": "mine", "model": "m", "meta": {"a": 1}}


def test_an_input_too_large_for_the_dead_letter_topic_becomes_a_bounded_dead_letter(tagger):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer(max_request_size=1_100_000)
    big = b"x" * 2_000_000
    consumer.append(0, big, key=b"k-big", headers=[("h", b"1")])
    consumer.append(0, NORMAL)
    limits = SizeLimits(output=1_048_588, dead_letter=1_048_588)
    running = run_until_done(tagger, consumer, producer, limits=limits)
    assert running.stop() == 0
    dead = producer.delivered(DLQ)[0]
    assert dead.header("ner_stream.reason") == b"too_large"
    assert dead.header("ner_stream.truncated") == b"true"
    assert dead.header("ner_stream.original.size") == b"2000000"
    assert dead.header("ner_stream.original.sha256") == hashlib.sha256(big).hexdigest().encode()
    assert dead.header("ner_stream.source.offset") == b"0"
    assert big.startswith(dead.value) and 0 < len(dead.value) <= 65_536
    assert dead.key == b"k-big" and dead.header("h") == b"1"
    assert record_size(dead.key, dead.value, dead.headers) <= limits.dead_letter
    assert output_ids(producer) == {"ok"}
    assert_one_result_per_offset(consumer, producer)


def test_an_output_over_the_limit_is_dead_lettered_before_it_is_sent(tagger):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    text = "Peter went to Paris . " * 400  # 800 entities: an output larger than its input
    consumer.append(0, doc("long", text), key=b"kl")
    consumer.append(0, NORMAL)
    limits = SizeLimits(output=40_000, dead_letter=1_048_576)
    running = run_until_done(tagger, consumer, producer, limits=limits, max_chunk_tokens=32)
    assert running.stop() == 0
    assert [s.topic for s in producer.sent].count(OUT) == 1  # never tried: no exception needed
    dead = producer.delivered(DLQ)[0]
    assert dead.header("ner_stream.reason") == b"output_too_large"
    assert b"limit 40000" in dead.header("ner_stream.detail")
    assert dead.value == doc("long", text)  # the input fits: it is carried whole
    digest = hashlib.sha256(dead.value).hexdigest().encode()
    assert dead.header("ner_stream.original.sha256") == digest
    assert output_ids(producer) == {"ok"}
    assert_one_result_per_offset(consumer, producer)


def test_a_dead_letter_the_topic_refuses_as_too_large_is_sent_again_cut_short(tagger):
    # The worker could not read the topic's limit at start: the broker refuses the dead letter.
    consumer = FakeConsumer(partitions=1)
    producer = FakeProducer(max_request_size=2_000_000, topic_limits={DLQ: 50_000})
    consumer.append(0, b"\xff" + b"y" * 200_000)
    consumer.append(0, NORMAL)
    running = run_until_done(tagger, consumer, producer, max_doc_bytes=1_500_000)
    assert running.stop() == 0
    failed = [s for s in producer.sent if s.topic == DLQ and s.outcome == "failed"]
    assert len(failed) == 1
    (dead,) = producer.delivered(DLQ)
    assert dead.header("ner_stream.reason") == b"invalid_utf8"
    assert record_size(dead.key, dead.value, dead.headers) <= TIGHT_DEAD_LETTER_BYTES
    assert dead.header("ner_stream.original.size") == b"200001"
    assert_one_result_per_offset(consumer, producer)


def test_an_output_the_topic_refuses_as_too_large_is_dead_lettered(tagger):
    consumer = FakeConsumer(partitions=1)
    producer = FakeProducer(topic_limits={OUT: 2_000})
    consumer.append(0, doc("long", "Peter went to Paris . " * 40))
    consumer.append(0, NORMAL)
    running = run_until_done(tagger, consumer, producer)
    assert running.stop() == 0
    (dead,) = producer.delivered(DLQ)
    assert dead.header("ner_stream.reason") == b"output_too_large"
    assert b"MessageSizeTooLargeError" in dead.header("ner_stream.detail")
    assert output_ids(producer) == {"ok"}
    assert_one_result_per_offset(consumer, producer)


def test_an_output_that_cannot_be_encoded_is_dead_lettered(tagger, monkeypatch):
    import ner_stream.delivery as delivery_module

    real = delivery_module.encode_output

    def encode(doc, *args):  # as for nesting that parses but cannot be written back
        if doc.id == "deep":
            raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")
        return real(doc, *args)

    monkeypatch.setattr(delivery_module, "encode_output", encode)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    consumer.append(0, doc("deep", "Peter ."))
    consumer.append(0, NORMAL)
    running = run_until_done(tagger, consumer, producer)
    assert running.stop() == 0
    (dead,) = producer.delivered(DLQ)
    assert dead.header("ner_stream.reason") == b"processing_error"
    assert dead.header("ner_stream.detail").startswith(b"RecursionError")
    assert output_ids(producer) == {"ok"}
    assert_one_result_per_offset(consumer, producer)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (KafkaTimeoutError("broker gone"), 1),  # about the cluster: stop, commit nothing past it
        (MessageSizeTooLargeError("one record"), 0),  # about the record: dead-letter, go on
    ],
)
def test_only_errors_about_the_broker_stop_the_worker(tagger, error, code):
    def fail(topic: str, value: bytes | None) -> BaseException | None:
        return error if topic == OUT and value and b'"id":"bad"' in value else None

    consumer, producer = FakeConsumer(partitions=1), FakeProducer(fail=fail)
    consumer.append(0, doc("bad", "Peter ."))
    consumer.append(0, NORMAL)
    running = Running(Worker(CFG, tagger, consumer, producer))
    if code == 1:
        running.thread.join(10)
        assert not running.thread.is_alive(), "the worker should stop by itself"
        assert running.stop() == 1
        assert all(om.offset == 0 for c in consumer.commits for om in c.values())
        assert not producer.delivered(DLQ)
    else:
        wait_for(lambda: committed_all(consumer), what="every offset committed")
        assert running.stop() == 0
        assert_one_result_per_offset(consumer, producer)


def test_the_dead_letter_records_where_the_original_is(tagger):
    consumer, producer = FakeConsumer(partitions=2), FakeProducer()
    consumer.append(1, b'{"text": 42}', key=b"\x00\xff binary key")
    running = run_until_done(tagger, consumer, producer)
    assert running.stop() == 0
    (dead,) = producer.delivered(DLQ)
    assert dead.key == b"\x00\xff binary key"
    assert json.loads(dead.value) == {"text": 42}
    assert (dead.header("ner_stream.source.topic"), dead.header("ner_stream.source.partition"),
            dead.header("ner_stream.source.offset")) == (IN.encode(), b"1", b"0")  # fmt: skip
