"""`InputConsumer`: the worker's one view of the consumer, checked against the in-memory one."""

from __future__ import annotations

import inspect
import threading

from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from ner_stream.kafka_io import ConsumerLike, InputConsumer
from tests.fakes import FakeConsumer


def test_the_in_memory_consumer_implements_the_whole_protocol():
    wanted = {name for name, _ in inspect.getmembers(ConsumerLike) if not name.startswith("_")}
    assert wanted >= {"seek", "position", "highwater", "commit_async"}
    missing = {name for name in wanted if not callable(getattr(FakeConsumer, name, None))}
    assert missing == set()


class Listener(ConsumerRebalanceListener):
    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        pass


def subscribed(partitions: int = 2) -> tuple[FakeConsumer, InputConsumer]:
    fake = FakeConsumer(partitions=partitions)
    consumer = InputConsumer(fake)
    consumer.subscribe("documents", Listener())
    list(consumer.poll(0, 10))  # the join: every partition assigned
    return fake, consumer


def test_commit_on_the_subscribing_thread_blocks_and_elsewhere_is_sent_without_waiting():
    fake, consumer = subscribed()
    calls: list[str] = []
    commit = fake.commit

    def blocking(offsets=None):
        calls.append("commit")
        commit(offsets)

    def without_waiting(offsets=None, callback=None):
        calls.append("async")
        commit(offsets)

    fake.commit, fake.commit_async = blocking, without_waiting
    consumer.commit({("documents", 0): 5})
    # kafka-python 3 calls the rebalance listener on its own I/O thread, where a blocking commit
    # is refused.
    other = threading.Thread(target=consumer.commit, args=({("documents", 1): 7},))
    other.start()
    other.join()
    assert calls == ["commit", "async"]
    assert fake.committed_offset(0) == 5 and fake.committed_offset(1) == 7


def test_lag_is_the_records_behind_the_end_of_each_assigned_partition():
    fake, consumer = subscribed()
    for _ in range(5):
        fake.append(0, b"x")
    fake.append(1, b"y")
    fake.limit(0, 2)
    list(consumer.poll(0, 10))
    assert consumer.lag() == {("documents", 0): 3, ("documents", 1): 0}


def test_rewind_seeks_back_and_a_partition_no_longer_owned_is_left_alone():
    fake, consumer = subscribed(partitions=1)
    for _ in range(4):
        fake.append(0, b"x")
    assert len(list(consumer.poll(0, 10))) == 4
    consumer.rewind(("documents", 0), 1)
    assert fake.seeks == [(TopicPartition("documents", 0), 1)]
    assert [r.offset for r in consumer.poll(0, 10)] == [1, 2, 3]
    consumer.rewind(("documents", 5), 0)  # not assigned: logged, not raised
    assert len(fake.seeks) == 1


def test_pause_and_resume_every_assigned_partition():
    fake, consumer = subscribed()
    assert consumer.pause() == 2
    assert fake.paused == set(fake.logs)
    assert consumer.resume() == 2
    assert fake.paused == set()
