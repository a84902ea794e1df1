"""Exactly-once delivery against a real broker: `ner-stream run --processing-guarantee exactly-once`
as subprocesses, killed, joined, expelled; a `read_committed` reader must see each input answered
exactly once, with no gaps.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time

import pytest

from tests.integration import worker_util as wu
from tests.integration.test_worker import (
    OUTPUT_TIMEOUT_S,
    START_TIMEOUT_S,
    _ids,
    _stop,
    _wait_assigned,
)

pytestmark = pytest.mark.integration

EXACTLY_ONCE = "exactly-once"
# The broker's smallest session timeout: a killed or stopped worker's partitions move on soonest.
SESSION_MS = 6000
BAD_EVERY = 250  # one record of this many is not UTF-8: its dead letter is in the transaction too


def _records(ids: list[str]) -> tuple[list, list[str]]:
    """Documents keyed by id, with an invalid record after every BAD_EVERY of them."""
    records, bad = [], []
    for i, record in enumerate(wu.doc_records(ids)):
        records.append(record)
        if i % BAD_EVERY == BAD_EVERY - 1:
            key = f"bad-{i}"
            bad.append(key)
            records.append((key.encode(), b"\xff\xfe not UTF-8", []))
    return records, bad


def _committed_reader(bootstrap: str, topic: str, json_ids: bool = True) -> wu.TopicReader:
    return wu.TopicReader(bootstrap, topic, json_ids=json_ids, isolation="read_committed")


def _flags(guarantee: str, instance: str) -> dict:
    return {
        "processing_guarantee": guarantee,
        "instance_id": instance,
        "session_timeout_ms": SESSION_MS,
        "commit_interval_ms": 500,
    }


def _check_answers(kafka_bootstrap, topics, ids, bad, exactly_once: bool) -> tuple[int, int]:
    """Read both topics to their ends (read_committed); assert no gaps, and with `exactly_once`
    no duplicates; returns (duplicate outputs, duplicate dead letters)."""
    with _committed_reader(kafka_bootstrap, topics.output) as out:
        outputs = wu.outputs_by_id(out.read_to_end())
    with _committed_reader(kafka_bootstrap, topics.dlq, json_ids=False) as dlq:
        letters: dict[str, int] = {}
        for r in dlq.read_to_end():
            key = (r.key or b"").decode()
            letters[key] = letters.get(key, 0) + 1
    missing = set(ids) - set(outputs)
    assert not missing, f"{len(missing)} documents without an output, e.g. {sorted(missing)[:5]}"
    assert set(letters) == set(bad), "every invalid record has a dead letter, and only they"
    dup_out = sum(len(v) - 1 for v in outputs.values())
    dup_dlq = sum(n - 1 for n in letters.values())
    if exactly_once:
        assert dup_out == 0, f"{dup_out} duplicate outputs seen by a read_committed reader"
        assert dup_dlq == 0, f"{dup_dlq} duplicate dead letters seen by a read_committed reader"
    return dup_out, dup_dlq


@pytest.mark.parametrize("guarantee", [EXACTLY_ONCE, "at-least-once"])
def test_repeated_sigkill_mid_stream_then_restart(
    guarantee,
    kafka_bootstrap,
    make_topics,
    start_worker,
    record_property,
):
    """Five SIGKILLs at random moments of one stream, each followed by a restart under the same
    instance id: exactly once, a read_committed reader sees one answer per input; at least once,
    none is missing."""
    topics = make_topics()
    ids = _ids(3000)
    records, bad = _records(ids)
    rng = random.Random(f"kill-{guarantee}")
    worker = start_worker("k0", topics, **_flags(guarantee, "w0"))
    _wait_assigned(worker)
    feeder = wu.BackgroundProducer(kafka_bootstrap, topics.input, records, 150)
    feeder.start()
    kills = 0
    with _committed_reader(kafka_bootstrap, topics.output) as reader:
        for k in range(5):
            seen = len(reader.ids)
            wu.wait_for(lambda seen=seen: len(reader.ids) > seen, OUTPUT_TIMEOUT_S + 30,
                        f"outputs from worker {k}", [worker], tick=reader.poll)  # fmt: skip
            time.sleep(rng.uniform(0.0, 1.5))
            worker.kill()  # SIGKILL: no flush, no commit, no abort, no leaving the group
            kills += 1
            worker = start_worker(f"k{k + 1}", topics, **_flags(guarantee, "w0"))
        feeder.result()
        wu.wait_for(lambda: set(ids) <= set(reader.ids), 180,
                    wu.ids_progress(reader, ids), [worker], tick=reader.poll)  # fmt: skip
        _stop(worker)
    dup_out, dup_dlq = _check_answers(kafka_bootstrap, topics, ids, bad, guarantee == EXACTLY_ONCE)
    record_property("kills", kills)
    record_property("duplicate_outputs", dup_out)
    print(f"\n{guarantee}: {kills} SIGKILLs, {dup_out} duplicate outputs, {dup_dlq} duplicate "
          "dead letters (read_committed)")  # fmt: skip


def test_exactly_once_across_a_worker_joining_and_one_leaving(
    kafka_bootstrap,
    make_topics,
    start_worker,
):
    topics = make_topics()
    ids = _ids(3000)
    records, bad = _records(ids)
    a = start_worker("ra", topics, **_flags(EXACTLY_ONCE, "a"))
    b = start_worker("rb", topics, **_flags(EXACTLY_ONCE, "b"))
    _wait_assigned(a)
    _wait_assigned(b)
    feeder = wu.BackgroundProducer(kafka_bootstrap, topics.input, records, 150)
    feeder.start()
    with _committed_reader(kafka_bootstrap, topics.output) as reader:
        wu.wait_for(lambda: len(reader.ids) >= 300, OUTPUT_TIMEOUT_S, "outputs of a and b",
                    [a, b], tick=reader.poll)  # fmt: skip
        c = start_worker("rc", topics, **_flags(EXACTLY_ONCE, "c"))  # joins mid-stream
        _wait_assigned(c)
        wu.wait_for(lambda: len(reader.ids) >= 1200, OUTPUT_TIMEOUT_S, "outputs after c joined",
                    [a, b, c], tick=reader.poll)  # fmt: skip
        _stop(a)  # leaves mid-stream
        feeder.result()
        wu.wait_for(lambda: set(ids) <= set(reader.ids), 120,
                    wu.ids_progress(reader, ids), [b, c], tick=reader.poll)  # fmt: skip
        _stop(b)
        _stop(c)
    _check_answers(kafka_bootstrap, topics, ids, bad, exactly_once=True)
    # The rebalances happened under transactions: each worker committed some.
    for w in (a, b, c):
        assert "partitions revoked" in w.log(), w.name


def test_a_worker_expelled_from_the_group_cannot_commit(
    kafka_bootstrap,
    make_topics,
    start_worker,
    record_property,
):
    """A zombie: worker A is frozen (SIGSTOP) with a transaction open, past the session timeout;
    B takes its partitions and redoes its work. Thawed, A's transaction carries offsets of a
    generation that has ended: the coordinator refuses them (KIP-447), A aborts, and nothing it
    sent is visible; a read_committed reader sees each input once."""
    topics = make_topics()
    ids = _ids(1500)
    records, bad = _records(ids)
    # A long commit interval: A is frozen with a transaction that holds many outputs.
    a = start_worker("za", topics, **{**_flags(EXACTLY_ONCE, "za"), "commit_interval_ms": 3000})
    _wait_assigned(a)
    feeder = wu.BackgroundProducer(kafka_bootstrap, topics.input, records, 150)
    feeder.start()
    with _committed_reader(kafka_bootstrap, topics.output) as reader:
        wu.wait_for(lambda: len(reader.ids) >= 100, OUTPUT_TIMEOUT_S, "outputs of A",
                    [a], tick=reader.poll)  # fmt: skip
        time.sleep(1.0)  # into A's next transaction
        a.signal(signal.SIGSTOP)
        frozen_at = len(a.log())
        try:
            b = start_worker("zb", topics, **_flags(EXACTLY_ONCE, "zb"))
            wu.wait_for(lambda: b.assigned() == set(range(4)), START_TIMEOUT_S + SESSION_MS / 1000,
                        "B to own every partition once A is expelled", [b])  # fmt: skip
            time.sleep(3.0)  # B redoes A's open work and commits it
        finally:
            a.signal(signal.SIGCONT)
        wu.wait_for(lambda: re.search(r"transaction aborted", a.log()[frozen_at:]), 60,
                    "A to abort its transaction once thawed", [a, b])  # fmt: skip
        feeder.result()
        wu.wait_for(lambda: set(ids) <= set(reader.ids), 120,
                    wu.ids_progress(reader, ids), [a, b], tick=reader.poll)  # fmt: skip
        _stop(a)
        _stop(b)
    _check_answers(kafka_bootstrap, topics, ids, bad, exactly_once=True)
    abort = re.search(r"transaction aborted \((\w+)", a.log()[frozen_at:])
    assert abort is not None
    record_property("zombie_abort", abort.group(1))
    # What A had sent is in the topic, aborted: a read_uncommitted reader sees it twice.
    with wu.TopicReader(kafka_bootstrap, topics.output, json_ids=True) as everything:
        everything.read_to_end()
    uncommitted_duplicates = sum(n - 1 for n in everything.ids.values())
    assert uncommitted_duplicates > 0
    print(f"\nzombie aborted ({abort.group(1)}); {uncommitted_duplicates} of its outputs are "
          "in the topic, aborted, invisible to read_committed")  # fmt: skip
    # `ner-stream consume` reads committed by default: one line per input.
    shown = subprocess.run(
        [wu.ner_stream_executable(), "consume", "--bootstrap-servers", kafka_bootstrap,
         "--topic", topics.output, "--idle-timeout-s", "3"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert len(shown) == len(ids)
