"""In-memory stand-ins for the Kafka clients the worker uses, and tiny taggers for unit tests.

`FakeConsumer` implements `kafka_io.ConsumerLike` and `FakeProducer` `delivery.ProducerLike`; both
follow kafka-python's behaviour where the worker depends on it:
the rebalance listener is called from inside `poll` (revoked, then assigned), a (re)assigned
partition starts at its last committed offset, paused partitions return no records, commits take
`{TopicPartition: OffsetAndMetadata}`, and a producer future runs its callbacks at once when it is
already done. Nothing here talks to a broker.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from kafka import ConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
)
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata, TopicPartition

from ner_stream.checkpoint import LoadedModel, ModelInfo
from ner_stream.model import ModelConfig, NerModel
from ner_stream.tagger import Tagger, TaggerOptions
from ner_stream.vocab import Vocab, Vocabularies

# ------------------------------------------------------------------------------------- consumer


@dataclass(frozen=True)
class Record:
    """A consumed record, with the attributes of kafka-python's ConsumerRecord the worker reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int


class FakeConsumer:
    """An in-memory KafkaConsumer for one consumer of a group (see the module docstring).

    `append` adds records; `rebalance` schedules a revoke + assign that the next `poll` runs
    through the listener; `limit` stops a partition from handing out offsets at or past a bound.
    Every `pause`, `resume`, `seek` and `commit` call is recorded.

    A partition (re)assigned starts at its committed offset, as in kafka-python 2.x. With
    `keep_positions=True` a partition revoked and given back in the same rebalance keeps its fetch
    position instead, as kafka-python 3.x does.
    """

    def __init__(
        self, topic: str = "documents", partitions: int = 2, keep_positions: bool = False
    ) -> None:
        self.topic = topic
        self.keep_positions = keep_positions
        self._lock = threading.RLock()
        self._new_data = threading.Condition(self._lock)
        self.logs: dict[TopicPartition, list[Record]] = {
            TopicPartition(topic, p): [] for p in range(partitions)
        }
        self.committed: dict[TopicPartition, OffsetAndMetadata] = {}
        self.commits: list[dict[TopicPartition, OffsetAndMetadata]] = []
        self.pause_calls: list[tuple[TopicPartition, ...]] = []
        self.resume_calls: list[tuple[TopicPartition, ...]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.limits: dict[TopicPartition, int] = {}
        self.listener: Any = None
        self.subscription: list[str] | None = None
        self.closed = False
        self.close_autocommit: bool | None = None
        self.polls = 0
        self._assigned: set[TopicPartition] = set()
        # The group's generation (each rebalance starts a new one), and the one this consumer
        # joined: they differ once the group moved on without it (`expel`).
        self.generation = 0
        self.joined_generation = 0
        self._needs_join = False
        self._rebalances: list[tuple[set[TopicPartition], set[TopicPartition]]] = []

    # -- test helpers

    def append(
        self,
        partition: int,
        value: bytes | None,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
        timestamp: int | None = None,
    ) -> int:
        """Append a record to `partition`; returns its offset."""
        tp = TopicPartition(self.topic, partition)
        with self._lock:
            log = self.logs[tp]
            ts = int(time.time() * 1000) if timestamp is None else timestamp
            log.append(Record(self.topic, partition, len(log), key, value, list(headers), ts))
            self._new_data.notify_all()
            return len(log) - 1

    def append_marker(self, partition: int) -> int:
        """Take up an offset of `partition` with a record that no poll hands out, as the commit or
        abort marker of a transaction (or a record compacted away) does; returns its offset."""
        tp = TopicPartition(self.topic, partition)
        with self._lock:
            log = self.logs[tp]
            log.append(None)  # type: ignore[arg-type]
            self._new_data.notify_all()
            return len(log) - 1

    def rebalance(
        self,
        revoke: Iterable[int] | None = None,
        assign: Iterable[int] | None = None,
    ) -> None:
        """Schedule a rebalance for the next poll: revoke, then assign (partition numbers).

        By default every owned partition is revoked and every partition assigned again (an eager
        rebalance where this consumer keeps everything).
        """
        with self._lock:
            rev = set(self._assigned) if revoke is None else {self._tp(p) for p in revoke}
            new = set(self.logs) if assign is None else {self._tp(p) for p in assign}
            self._rebalances.append((rev, new))
            self._new_data.notify_all()

    def limit(self, partition: int, offset: int | None) -> None:
        """Hand out records of `partition` only below `offset` (None: no bound)."""
        tp = self._tp(partition)
        with self._lock:
            if offset is None:
                self.limits.pop(tp, None)
            else:
                self.limits[tp] = offset
            self._new_data.notify_all()

    def expel(self) -> None:
        """The group moves on without this consumer (it was silent past the session timeout):
        a new generation that this consumer has not joined, so its group metadata is stale."""
        with self._lock:
            self.generation += 1

    def committed_offset(self, partition: int) -> int | None:
        with self._lock:
            om = self.committed.get(self._tp(partition))
            return None if om is None else om.offset

    def end_offset(self, partition: int) -> int:
        with self._lock:
            return len(self.logs[self._tp(partition)])

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.topic, partition)

    # -- the KafkaConsumer API the worker uses

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        # kafka-python refuses a listener that does not subclass its listener ABC.
        if listener is not None and not isinstance(listener, ConsumerRebalanceListener):
            raise TypeError("listener must be a ConsumerRebalanceListener")
        if isinstance(topics, str):
            raise TypeError("Topics must be a list (or non-str sequence)")
        with self._lock:
            unknown = set(topics) - {self.topic}
            if unknown:
                raise ValueError(f"this fake only knows topic {self.topic!r}, not {unknown}")
            self.subscription = list(topics)
            self.listener = listener
            self._needs_join = True

    def topics(self) -> set[str]:
        return {self.topic}

    def assignment(self) -> set[TopicPartition]:
        with self._lock:
            return set(self._assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self._check_tps(partitions)
        with self._lock:
            for tp in partitions:
                if tp not in self._assigned:
                    raise KeyError(tp)  # as kafka-python's subscription state does
            self.pause_calls.append(tuple(partitions))
            self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._check_tps(partitions)
        with self._lock:
            for tp in partitions:
                if tp not in self._assigned:
                    raise KeyError(tp)
            self.resume_calls.append(tuple(partitions))
            self.paused.difference_update(partitions)
            self._new_data.notify_all()

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._check_tps([partition])
        with self._lock:
            if partition not in self._assigned:
                raise KeyError(partition)
            if not 0 <= offset <= len(self.logs[partition]):
                raise ValueError(f"offset {offset} out of range for {partition}")
            self.seeks.append((partition, offset))
            self.positions[partition] = offset

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        if self.closed:
            raise RuntimeError("poll on a closed consumer")
        if self.subscription is None:
            raise RuntimeError("poll before subscribe")
        self.polls += 1
        self._run_rebalances()
        with self._lock:
            records = self._fetch(max_records)
            if not records and timeout_ms:
                # Like a real poll, wait for data a little; short so that the tests stay fast.
                self._new_data.wait(min(timeout_ms / 1000, 0.01))
        if not records:
            self._run_rebalances()
            with self._lock:
                records = self._fetch(max_records)
        return records

    def commit(self, offsets: dict | None = None) -> None:
        with self._lock:
            if offsets is None:
                offsets = {tp: OffsetAndMetadata(pos, "", -1) for tp, pos in self.positions.items()}
            if not all(isinstance(tp, TopicPartition) for tp in offsets) or not all(
                isinstance(om, OffsetAndMetadata) for om in offsets.values()
            ):
                raise TypeError("offsets must be dict[TopicPartition, OffsetAndMetadata]")
            self.commits.append(dict(offsets))
            self.committed.update(offsets)

    def commit_async(self, offsets: dict | None = None, callback: Any = None) -> None:
        """Recorded like `commit` (this fake has no I/O thread to defer it to)."""
        self.commit(offsets)

    def group_metadata(self) -> ConsumerGroupMetadata:
        with self._lock:
            return ConsumerGroupMetadata(
                "ner-stream", self.joined_generation, "member-1", None, "stable"
            )

    def position(self, partition: TopicPartition, timeout_ms: int | None = None) -> int | None:
        self._check_tps([partition])
        with self._lock:
            if partition not in self._assigned:
                raise KeyError(partition)
            return self.positions.get(partition)

    def highwater(self, partition: TopicPartition) -> int | None:
        self._check_tps([partition])
        with self._lock:
            return len(self.logs[partition]) if partition in self._assigned else None

    def close(self, autocommit: bool = True) -> None:
        with self._lock:
            self.closed = True
            self.close_autocommit = autocommit

    # -- internals

    @staticmethod
    def _check_tps(partitions: Iterable[Any]) -> None:
        if not all(isinstance(p, TopicPartition) for p in partitions):
            raise TypeError("partitions must be TopicPartition namedtuples")

    def _run_rebalances(self) -> None:
        """Revoke/assign through the listener, outside the lock (the listener calls back in)."""
        while True:
            with self._lock:
                if self._needs_join:
                    self._needs_join = False
                    step = (set(), set(self.logs))
                elif self._rebalances:
                    step = self._rebalances.pop(0)
                else:
                    return
            revoked, assigned = step
            revoked &= self.assignment()
            if revoked and self.listener is not None:
                self.listener.on_partitions_revoked(sorted(revoked))
            with self._lock:
                # The revoke above ran under the ending generation, as in an eager rebalance.
                self.generation += 1
                self.joined_generation = self.generation
                kept = self._assigned - revoked
                old_positions = dict(self.positions)
                self._assigned = set(assigned)
                self.paused &= kept & self._assigned
                for tp in list(self.positions):
                    if tp not in self._assigned:
                        del self.positions[tp]
                for tp in self._assigned - kept:
                    om = self.committed.get(tp)
                    self.positions[tp] = 0 if om is None else om.offset
                    if self.keep_positions and tp in old_positions:
                        self.positions[tp] = old_positions[tp]
            # Eager: everything was revoked, so all is new; cooperative: only the added ones.
            if self.listener is not None:
                self.listener.on_partitions_assigned(sorted(assigned - kept))

    def _fetch(self, max_records: int | None) -> dict[TopicPartition, list[Record]]:
        out: dict[TopicPartition, list[Record]] = {}
        budget = max_records if max_records is not None else 500
        for tp in sorted(self._assigned):
            if budget <= 0:
                break
            if tp in self.paused:
                continue
            log = self.logs[tp]
            pos = self.positions[tp]
            end = min(len(log), self.limits.get(tp, len(log)), pos + budget)
            if end > pos:
                records = [r for r in log[pos:end] if r is not None]  # markers are skipped
                if records:
                    out[tp] = records
                self.positions[tp] = end
                budget -= len(records)
        return out


# ------------------------------------------------------------------------------------- producer


@dataclass(frozen=True)
class FakeMetadata:
    topic: str
    partition: int
    offset: int


class FakeFuture:
    """kafka-python's FutureRecordMetadata, as far as the worker uses it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Any], Any]] = []
        self._errbacks: list[Callable[[BaseException], Any]] = []
        self.is_done = False
        self.value: Any = None
        self.exception: BaseException | None = None

    def add_callback(self, fn: Callable[[Any], Any]) -> FakeFuture:
        with self._lock:
            if not self.is_done:
                self._callbacks.append(fn)
                return self
        if self.exception is None:
            fn(self.value)
        return self

    def add_errback(self, fn: Callable[[BaseException], Any]) -> FakeFuture:
        with self._lock:
            if not self.is_done:
                self._errbacks.append(fn)
                return self
        if self.exception is not None:
            fn(self.exception)
        return self

    def _resolve(self, value: Any, exception: BaseException | None) -> None:
        with self._lock:
            if self.is_done:
                return
            self.is_done, self.value, self.exception = True, value, exception
            callbacks, errbacks = self._callbacks, self._errbacks
            self._callbacks, self._errbacks = [], []
        if exception is None:
            for fn in callbacks:
                fn(value)
        else:
            for fn in errbacks:
                fn(exception)


@dataclass
class Sent:
    """One `send` call, and what became of it."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    future: FakeFuture = field(default_factory=FakeFuture)
    outcome: str = "pending"  # pending, delivered or failed
    size: int = 0  # kafka-python's estimate of the record's size

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        assert self.value is not None
        return json.loads(self.value)


class FakeProducer:
    """An in-memory KafkaProducer.

    By default each send is acknowledged at once. With `hold=True` acknowledgements wait for
    `release()` (and `flush` times out instead of delivering). `fail` decides, per send, whether
    it fails: it gets (topic, value) and returns an exception to fail with, or None.
    """

    def __init__(
        self,
        hold: bool = False,
        fail: Callable[[str, bytes | None], BaseException | None] | None = None,
        max_request_size: int = 1_048_576,
        topic_limits: dict[str, int] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.hold = hold
        self.fail = fail
        self.max_request_size = max_request_size
        # Per topic: larger records are refused on delivery, as a broker's max.message.bytes does.
        self.topic_limits = topic_limits or {}
        self.sent: list[Sent] = []
        self._pending: list[Sent] = []
        self._next_offset: dict[str, int] = defaultdict(int)
        self.flushes = 0
        self.closed = False

    def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None
    ) -> FakeFuture:
        if self.closed:
            raise RuntimeError("send on a closed producer")
        # kafka-python's own checks, in its order.
        if value is None and key is None:
            raise ValueError("Need at least one: key or value")
        if value is not None and not isinstance(value, bytes):
            raise TypeError("value must be bytes")
        headers = list(headers or [])
        for name, v in headers:
            if not isinstance(name, str) or not isinstance(v, bytes):
                raise TypeError("All headers items must be (str, bytes) tuples")
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        sent = Sent(topic, value, key, headers)
        sent.size = size
        with self._lock:
            self.sent.append(sent)
            hold = self.hold
            if hold:
                self._pending.append(sent)
        if not hold:
            self._deliver([sent])
        return sent.future

    def release(self, n: int | None = None) -> int:
        """Acknowledge (or fail) the first `n` held sends, all by default; returns how many."""
        with self._lock:
            n = len(self._pending) if n is None else n
            batch, self._pending = self._pending[:n], self._pending[n:]
        self._deliver(batch)
        return len(batch)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1
        if self.hold:
            if self.pending():
                raise KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")
            return
        self.release()

    def close(self, timeout: float | None = None) -> None:
        if not self.hold:
            self.release()
        self.closed = True

    def _deliver(self, batch: list[Sent]) -> None:
        for sent in batch:
            error = self.fail(sent.topic, sent.value) if self.fail else None
            if error is None and sent.size > self.topic_limits.get(sent.topic, sent.size):
                error = MessageSizeTooLargeError(f"{sent.size} bytes, over the topic's limit")
            if error is None:
                with self._lock:
                    offset = self._next_offset[sent.topic]
                    self._next_offset[sent.topic] += 1
                sent.outcome = "delivered"
                sent.future._resolve(FakeMetadata(sent.topic, 0, offset), None)
            else:
                sent.outcome = "failed"
                sent.future._resolve(None, error)

    # -- views for assertions

    def delivered(self, topic: str) -> list[Sent]:
        """The records that reached `topic` (acknowledged), in send order."""
        with self._lock:
            return [s for s in self.sent if s.topic == topic and s.outcome == "delivered"]


class FakeTransactionalProducer(FakeProducer):
    """An in-memory transactional KafkaProducer whose offsets go to `consumer`'s group.

    Follows kafka-python and the broker where the worker depends on it: `send` only inside a
    transaction; a failed send leaves the transaction abortable (every later call but
    `abort_transaction` raises); offsets sent with group metadata of an ended generation are
    refused with `CommitFailedError` (KIP-447); `fence()` makes every call raise
    `ProducerFencedError`, as when another producer took the transactional id. `visible(topic)`
    is what a read_committed reader sees; `fail_commits` fails that many commits at the broker.
    """

    def __init__(self, consumer: FakeConsumer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.consumer = consumer
        self.state = "ready"  # ready, in_transaction, abortable, fenced
        self.fail_commits = 0
        self.committed_sends: list[Sent] = []
        self.transactions: list[str] = []  # committed / aborted, in order
        self._in_transaction: list[Sent] = []
        self._offsets: dict[TopicPartition, OffsetAndMetadata] = {}

    def _check(self, *states: str) -> None:
        if self.state == "fenced":
            raise ProducerFencedError("another producer took this transactional id")
        if self.state == "abortable" and "abortable" not in states:
            raise KafkaError("Cannot execute transactional method because we are in an error state")
        if self.state not in states:
            raise IllegalStateError(f"not allowed in state {self.state}")

    def fence(self) -> None:
        self.state = "fenced"

    def begin_transaction(self) -> None:
        self._check("ready")
        self.state = "in_transaction"

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
             headers: Any = None) -> FakeFuture:  # fmt: skip
        self._check("in_transaction")
        future = super().send(topic, value, key, headers)
        with self._lock:
            self._in_transaction.append(self.sent[-1])
        return future

    def _deliver(self, batch: list[Sent]) -> None:
        for i, sent in enumerate(batch):
            super()._deliver([sent])
            if sent.outcome == "failed" and self.state == "in_transaction":
                self.state = "abortable"
                # As kafka-python 3 does (KIP-654, `abort_undrained_batches`): the sends of the
                # transaction not on their way yet fail with the error that made it abortable.
                with self._lock:
                    rest, self._pending = batch[i + 1 :] + self._pending, []
                for other in rest:
                    other.outcome = "failed"
                    other.future._resolve(None, sent.future.exception)
                return

    def send_offsets_to_transaction(self, offsets: dict, group_metadata: Any) -> None:
        self._check("in_transaction")
        if group_metadata.generation_id != self.consumer.generation:
            self.state = "abortable"
            raise CommitFailedError("consumer group metadata mismatch: IllegalGenerationError")
        self._offsets.update(offsets)

    def commit_transaction(self) -> None:
        self._check("in_transaction")
        self.flush()
        if self.state != "in_transaction":
            self._check("in_transaction")
        if self.fail_commits:
            self.fail_commits -= 1
            self.state = "abortable"
            raise KafkaError("the transaction coordinator could not be reached")
        with self._lock:
            self.committed_sends.extend(self._in_transaction)
            self._in_transaction = []
        if self._offsets:
            self.consumer.commit(dict(self._offsets))
        self._offsets = {}
        self.transactions.append("committed")
        self.state = "ready"

    def abort_transaction(self) -> None:
        self._check("in_transaction", "abortable")
        with self._lock:
            self._in_transaction = []
        self._offsets = {}
        self.transactions.append("aborted")
        self.state = "ready"

    def visible(self, topic: str) -> list[Sent]:
        """What a read_committed reader of `topic` sees: records of committed transactions."""
        with self._lock:
            return [s for s in self.committed_sends if s.topic == topic]


# ------------------------------------------------------------------------------------ taggers

TAGS = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]
WORDS = ["<PAD>", "<UNK>", "peter", "went", "to", "paris", "and", "the", "."]
CHARS = ["<PAD>", "<UNK>", *sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ."))]


def _vocabs(words: list[str] = WORDS, tags: list[str] = TAGS) -> Vocabularies:
    return Vocabularies(Vocab(words), Vocab(CHARS), Vocab(tags))


def rigged_model(
    words: list[str] = WORDS, name: str = "rigged", version: str = "0.0.1"
) -> LoadedModel:
    """A classic-LSTM model whose weights tag "Peter" as S-PER, "Paris" as S-LOC, all else O.

    The LSTM forgets its state at every step (forget gate shut, no recurrent weights), so each
    token's tag depends on that token alone; two embedding dimensions flag the two words.
    `words` (which must hold "peter" and "paris") may order the vocabulary otherwise.
    """
    config = ModelConfig(
        arch="lstm", num_words=len(words), num_chars=len(CHARS), num_tags=len(TAGS),
        word_dim=4, hidden=4, dropout=0.0,
    )  # fmt: skip
    model = NerModel(config)
    h = config.hidden
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.word_embed.weight[words.index("peter"), 0] = 10.0
        model.word_embed.weight[words.index("paris"), 1] = 10.0
        # Gate order in PyTorch: input, forget, cell, output.
        model.lstm.bias_ih_l0[0:h] = 10.0  # input gate open
        model.lstm.bias_ih_l0[h : 2 * h] = -10.0  # forget gate shut
        model.lstm.bias_ih_l0[3 * h : 4 * h] = 10.0  # output gate open
        model.lstm.weight_ih_l0[2 * h + 0, 0] = 1.0  # cell 0 <- "peter" flag
        model.lstm.weight_ih_l0[2 * h + 1, 1] = 1.0  # cell 1 <- "paris" flag
        model.proj.bias[:] = -5.0
        model.proj.bias[TAGS.index("O")] = 0.0
        model.proj.weight[TAGS.index("S-PER"), 0] = 20.0
        model.proj.weight[TAGS.index("S-LOC"), 1] = 20.0
    model.eval()
    info = ModelInfo(name=name, version=version, config=config, vocabs=_vocabs(words))
    return LoadedModel(info=info, model=model)


def random_model(
    seed: int = 0,
    arch: str = "bilstm-crf",
    words: list[str] = WORDS,
    tags: list[str] = TAGS,
    name: str = "random",
    version: str = "0.0.2",
) -> LoadedModel:
    """A small model with N(0, 1) weights: arbitrary but plentiful entities.

    The spread of the weights spreads the argmax over the tags, so most documents get entities.
    """
    torch.manual_seed(seed)
    config = ModelConfig(
        arch=arch, num_words=len(words), num_chars=len(CHARS), num_tags=len(tags),
        word_dim=8, char_dim=4, char_filters=6, case_dim=2, hidden=8, dropout=0.0,
    )  # fmt: skip
    model = NerModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.eval()
    info = ModelInfo(name=name, version=version, config=config, vocabs=_vocabs(words, tags))
    return LoadedModel(info=info, model=model)


def make_tagger(kind: str = "rigged", **options: Any) -> Tagger:
    """A CPU tagger on a tiny model: `rigged` (predictable entities) or `random`."""
    loaded = rigged_model() if kind == "rigged" else random_model()
    opts = {"device": "cpu", "max_chunk_tokens": 32, "max_pass_tokens": 256, **options}
    return Tagger(loaded, TaggerOptions(**opts))


@pytest.fixture
def tagger() -> Tagger:
    """The rigged tagger: "Peter" -> PER, "Paris" -> LOC (see `rigged_model`)."""
    return make_tagger("rigged")


# ------------------------------------------------------------------------------------ waiting


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)
