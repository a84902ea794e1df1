"""A seeded corpus of 10,000 records, hostile ones mixed with valid documents, through one real
worker and the real broker: every record ends as exactly the output or dead letter its kind calls
for, the worker keeps running, every offset is committed, and the metrics count the same.

The output and dead-letter topics take records of at most 64 KiB, so that outputs too large for
their topic and dead letters that must be bounded both occur. Records kafka-python cannot write
(null key and value, null header values) are covered in test_hostile_records.py with Kafka's own
console producer.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from collections import Counter

import pytest

from tests import hostile, kafka_util
from tests.integration import worker_util as wu
from tests.integration.test_worker import start_worker, tiny_model  # noqa: F401
from tests.integration.worker_util import Topics

pytestmark = pytest.mark.integration

RECORDS = 10_000
TOPIC_LIMIT = 65_536
MAX_DOC_BYTES = 100_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str, label: str, value: str) -> float:
    pattern = rf'^{name}\{{{label}="{value}"\}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _results(bootstrap: str, output: str, dlq: str) -> dict[tuple[int, int], list[str]]:
    """Per input (partition, offset): what came of it, `hostile.OUTPUT` or a dead-letter reason."""
    found: dict[tuple[int, int], list[str]] = {}
    with wu.TopicReader(bootstrap, output) as reader:
        for record in reader.read_to_end(timeout_s=120):
            source = record.json()["source"]
            found.setdefault((source["partition"], source["offset"]), []).append(hostile.OUTPUT)
    with wu.TopicReader(bootstrap, dlq) as reader:
        for record in reader.read_to_end(timeout_s=120):
            headers = dict(record.headers)
            where = (int(headers["ner_stream.source.partition"]),
                     int(headers["ner_stream.source.offset"]))  # fmt: skip
            found.setdefault(where, []).append(headers["ner_stream.reason"].decode())
            assert len(record.value or b"") + len(record.key or b"") <= TOPIC_LIMIT
    return found


def test_ten_thousand_hostile_and_valid_records_through_one_worker(
    kafka_bootstrap,
    topic_factory,
    start_worker,  # noqa: F811
):
    limit = {"max.message.bytes": str(TOPIC_LIMIT)}
    topics = Topics(
        input=topic_factory(partitions=2, prefix="hostile-in"),
        output=topic_factory(partitions=2, prefix="hostile-out", configs=limit),
        dlq=topic_factory(partitions=1, prefix="hostile-dlq", configs=limit),
        group=kafka_util.unique_name("hostile-group"),
    )
    records = hostile.corpus(seed=18, n=RECORDS, max_doc_bytes=MAX_DOC_BYTES,
                             output_limit=TOPIC_LIMIT, null_kinds=False)  # fmt: skip
    producer = wu.make_producer(kafka_bootstrap)
    producer.config["max_request_size"] = 1_048_576
    produced = wu.produce_records(kafka_bootstrap, topics.input,
                                  [(r.key, r.value, r.headers) for r in records],
                                  producer=producer)  # fmt: skip
    producer.close(timeout=10)
    port = _free_port()
    worker = start_worker("hostile", topics, max_doc_bytes=MAX_DOC_BYTES, metrics_port=port,
                          log_level="ERROR")  # fmt: skip
    ends = wu.end_offsets(kafka_bootstrap, topics.input, 2)
    wu.wait_for(
        lambda: wu.committed_offsets(kafka_bootstrap, topics.group, topics.input, 2) == ends,
        timeout_s=600, what="every input offset committed", workers=[worker], interval_s=1.0,
    )  # fmt: skip
    assert worker.alive(), worker.tail()

    results = _results(kafka_bootstrap, topics.output, topics.dlq)
    wrong, counts = [], Counter()
    for record, where in zip(records, produced, strict=True):
        got = results.get((where.partition, where.offset), [])
        counts[record.expect] += 1
        if len(got) != 1 or got[0] != record.expect:
            wrong.append((record.kind, record.expect, got))
    assert not wrong, f"{len(wrong)} records wrong, e.g. {wrong[:5]}"
    assert sum(len(v) for v in results.values()) == RECORDS  # nothing extra either

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = "ner_stream_documents_total"
    assert _metric(text, total, "outcome", "ok") == counts[hostile.OUTPUT]
    assert _metric(text, total, "outcome", "dead_letter") == RECORDS - counts[hostile.OUTPUT]
    for reason, count in counts.items():
        if reason != hostile.OUTPUT:
            assert _metric(text, "ner_stream_dead_letters_total", "reason", reason) == count
    print(json.dumps(dict(sorted(counts.items()))))
