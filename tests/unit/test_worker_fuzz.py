"""Property-based and corpus tests of the record path (decode -> tag -> encode -> produce) with the
in-memory stand-ins: whatever a Kafka producer can legally write, the loop ends each record as
exactly one output or one dead letter no larger than its topic takes, and never stops.

One worker runs for a whole test; each generated example appends its records to the running
worker's partition and waits until they are committed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ner_stream.kafka_io import SizeLimits
from ner_stream.messages import record_size
from ner_stream.metrics import Metrics
from ner_stream.worker import Worker
from tests.fakes import FakeConsumer, FakeProducer, wait_for
from tests.hostile import MAKERS, NULL_KINDS, OUTPUT, corpus
from tests.unit.test_worker import CFG, DLQ, OUT, Running
from tests.unit.test_worker import tagger as tagger  # noqa: F401  (the module's fixture)

MAX_DOC_BYTES = 6_000
LIMIT = 8_192  # output and dead-letter topics alike (the broker's max.message.bytes)
CONFIG = replace(CFG, max_doc_bytes=MAX_DOC_BYTES, max_batch_docs=64, max_batch_tokens=2048,
                 queue_docs=256)  # fmt: skip


class Harness:
    """A worker over one partition whose producer and topics take records of at most LIMIT."""

    def __init__(self, tagger) -> None:
        self.consumer = FakeConsumer(partitions=1)
        self.producer = FakeProducer(max_request_size=LIMIT, topic_limits={OUT: LIMIT, DLQ: LIMIT})
        self.metrics = Metrics()
        limits = SizeLimits(output=LIMIT, dead_letter=LIMIT)
        worker = Worker(CONFIG, tagger, self.consumer, self.producer, self.metrics, limits=limits)
        self.running = Running(worker)

    def feed(self, records: list[tuple[bytes | None, bytes | None, list]]) -> list[int]:
        """Append records (key, value, headers), wait until all are committed; their offsets."""
        offsets = [self.consumer.append(0, value, key=key, headers=headers)
                   for key, value, headers in records]  # fmt: skip
        end = offsets[-1] + 1
        wait_for(lambda: (self.consumer.committed_offset(0) or 0) >= end, timeout=180,
                 what="the records committed")  # fmt: skip
        assert self.running.thread.is_alive(), "the worker stopped"
        return offsets

    def results(self) -> dict[int, list[tuple[str, object]]]:
        """Per input offset: ("output", the output object) and ("dead", the reason) results."""
        found: dict[int, list[tuple[str, object]]] = {}
        for sent in self.producer.delivered(OUT):
            out = json.loads(sent.value)
            found.setdefault(out["source"]["offset"], []).append(("output", out))
        for sent in self.producer.delivered(DLQ):
            offset = int(sent.header("ner_stream.source.offset"))
            found.setdefault(offset, []).append(("dead", sent.header("ner_stream.reason").decode()))
        return found

    def assert_sizes(self) -> None:
        for sent in self.producer.sent:
            assert record_size(sent.key, sent.value, sent.headers) <= LIMIT
            assert sent.outcome == "delivered", (sent.topic, sent.headers[-8:])


keys = st.one_of(st.none(), st.binary(max_size=40), st.just(b"K" * 3_000))
headers = st.lists(
    st.tuples(st.text(max_size=12), st.one_of(st.none(), st.binary(max_size=24))), max_size=40
)
json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)  # fmt: skip
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
texts = st.one_of(st.text(max_size=200), st.sampled_from(["Peter went to Paris .", ""]))
objects = st.builds(
    lambda text, doc_id, extra: {**extra, "id": doc_id, "text": text},
    texts,
    st.one_of(st.none(), st.text(max_size=20), st.integers(), st.floats()),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)
raw_json = st.sampled_from(
    [b'{"text": "Peter .", "w": 1e309}', b'{"text": "a", "text": "Peter ."}',
     b'{"text": "\\ud800"}', b"\xef\xbb\xbf" + b'{"text": "Paris ."}', b'{"text": "x", "n": NaN}',
     b"[" * 5_000 + b"]" * 5_000, b'{"text": "' + b"Peter " * 1_200 + b'"}']
)  # fmt: skip
values = st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    objects.map(lambda o: json.dumps(o, ensure_ascii=False, allow_nan=True).encode()),
    raw_json,
)
records = st.lists(st.tuples(keys, values, headers), min_size=1, max_size=6)


def test_any_legal_record_ends_as_one_output_or_one_dead_letter_within_the_limit(tagger):
    harness = Harness(tagger)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(records)
    def check(batch):
        offsets = harness.feed(batch)
        found = harness.results()
        for offset in offsets:
            assert len(found.get(offset, [])) == 1, (offset, found.get(offset))

    try:
        check()
        harness.assert_sizes()
    finally:
        assert harness.running.stop() == 0


def test_a_seeded_hostile_corpus_is_accounted_for_record_by_record(tagger):
    harness = Harness(tagger)
    sent = corpus(seed=18, n=1_000, max_doc_bytes=MAX_DOC_BYTES, output_limit=LIMIT)
    try:
        offsets = harness.feed([(r.key, r.value, r.headers) for r in sent])
        found = harness.results()
        wrong = []
        for record, offset in zip(sent, offsets, strict=True):
            (result,) = found[offset]
            got = OUTPUT if result[0] == "output" else result[1]
            if got != record.expect:
                wrong.append((record.kind, record.expect, got))
        assert not wrong, wrong[:10]
        harness.assert_sizes()
        assert {r.kind for r in sent} == set(MAKERS) | set(NULL_KINDS) | {"valid"}
        # The metrics tell the same story as the topics.
        expected = Counter(r.expect for r in sent)
        for reason, count in expected.items():
            if reason != OUTPUT:
                assert harness.metrics.dead_letters.labels(reason)._value.get() == count, reason
        assert harness.metrics.outcome["ok"]._value.get() == expected[OUTPUT]
        assert harness.metrics.outcome["dead_letter"]._value.get() == len(sent) - expected[OUTPUT]
    finally:
        assert harness.running.stop() == 0
