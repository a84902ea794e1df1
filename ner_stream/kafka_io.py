"""The Kafka shell: building the clients, waiting for the broker, checking or creating topics, and
`InputConsumer`, the one place that knows how kafka-python's consumer behaves across versions."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from ner_stream.config import WorkerConfig

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A configuration or environment problem found at start; the message is one sentence."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def connect_admin(cfg: WorkerConfig) -> KafkaAdminClient:
    """An admin client, retried with exponential backoff for up to `connect_timeout_s`."""
    deadline = time.monotonic() + cfg.connect_timeout_s
    delay = 0.25
    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        try:
            return KafkaAdminClient(
                bootstrap_servers=cfg.bootstrap_servers,
                client_id=f"{cfg.client_id}-admin",
                request_timeout_ms=10_000,
                bootstrap_timeout_ms=int(max(500, min(5_000, left * 1000))),
                **cfg.kafka_security(),
            )
        except (KafkaError, OSError) as e:
            last = e
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartupError(
                f"cannot reach Kafka at {cfg.bootstrap_servers} after {cfg.connect_timeout_s:g} s "
                f"({type(last).__name__})",
                exit_code=3,
            )
        log.warning("Kafka at %s not reachable yet; retrying in %.1f s", cfg.bootstrap_servers,
                    min(delay, left))  # fmt: skip
        time.sleep(min(delay, left))
        delay = min(delay * 2, 5.0)


def ensure_topics(admin: KafkaAdminClient, cfg: WorkerConfig) -> None:
    """Create the three topics (`--create-topics`) or check that the input topic exists."""
    names = [cfg.input_topic, cfg.output_topic, cfg.dlq_topic]
    existing = set(admin.list_topics())
    if cfg.create_topics:
        missing = [n for n in names if n not in existing]
        if missing:
            new = [NewTopic(n, cfg.topic_partitions, 1) for n in missing]
            # Another worker of the group may have created them first.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
            log.info("created topics %s with %d partitions", missing, cfg.topic_partitions)
        return
    if cfg.input_topic not in existing:
        raise StartupError(
            f"input topic {cfg.input_topic!r} does not exist; create it or pass --create-topics"
        )
    for name in (cfg.output_topic, cfg.dlq_topic):
        if name not in existing:
            log.warning("topic %r does not exist yet; the broker must auto-create it", name)


def make_consumer(cfg: WorkerConfig) -> KafkaConsumer:
    """The input consumer: manual commits, starting from the earliest offset of a new group."""
    return KafkaConsumer(
        bootstrap_servers=cfg.bootstrap_servers,
        group_id=cfg.group_id,
        client_id=f"{cfg.client_id}-consumer",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=max(1000, cfg.session_timeout_ms // 3),
        max_poll_records=cfg.max_batch_docs * 4,
        fetch_max_bytes=max(52_428_800, cfg.max_doc_bytes * 2),
        max_partition_fetch_bytes=max(1_048_576, cfg.max_doc_bytes + 65_536),
        fetch_min_bytes=65_536,
        fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        # Exactly-once reads only committed input, as it writes: an upstream transaction that
        # aborts must not reach the output.
        isolation_level="read_committed" if cfg.exactly_once else "read_uncommitted",
        **cfg.kafka_security(),
    )


def max_request_size(cfg: WorkerConfig) -> int:
    """The producer's ``max_request_size`` in bytes: room for the largest accepted input."""
    return max(1_048_576, cfg.max_doc_bytes + 65_536)


def make_producer(cfg: WorkerConfig, **overrides: Any) -> KafkaProducer:
    """The output producer: acks from all in-sync replicas, idempotent, small linger; with
    exactly-once, transactional (`WorkerConfig.transactional_id`), its transactions initialised.

    Raises `StartupError` (exit code 3) when the transactions cannot be initialised.
    """
    transactional_id = cfg.transactional_id()
    if transactional_id is not None:
        overrides = {"transactional_id": transactional_id,
                     "transaction_timeout_ms": cfg.transaction_timeout_ms, **overrides}  # fmt: skip
    settings: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": f"{cfg.client_id}-producer",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "batch_size": 65_536,
        "max_request_size": max_request_size(cfg),
        **cfg.kafka_security(),
    }
    settings.update(overrides)
    producer = KafkaProducer(**settings)
    if transactional_id is not None:
        try:
            # Fences an earlier producer of this transactional id (this worker before a crash)
            # and aborts the transaction it left open.
            producer.init_transactions()
        except KafkaError as e:
            producer.close(timeout=1)
            raise StartupError(
                f"cannot initialise Kafka transactions for transactional id "
                f"{transactional_id!r} ({type(e).__name__}: {e})",
                exit_code=3,
            ) from e
    return producer


@dataclass(frozen=True)
class SizeLimits:
    """The largest record, in bytes (as ``messages.record_size`` counts), each topic accepts."""

    output: int
    dead_letter: int

    @classmethod
    def of_producer(cls, cfg: WorkerConfig) -> SizeLimits:
        """Both limits at the producer's ``max_request_size`` (topic limits unknown)."""
        limit = max_request_size(cfg)
        return cls(output=limit, dead_letter=limit)


def size_limits(admin: KafkaAdminClient, cfg: WorkerConfig) -> SizeLimits:
    """The producer's limit, lowered to each topic's ``max.message.bytes`` where it is smaller.

    The topic configurations are read once at start; when they cannot be read (no
    DescribeConfigs permission, say) the producer's limit stands, and a record the broker still
    refuses as too large is dead-lettered when its delivery fails.
    """
    limits = SizeLimits.of_producer(cfg)
    topics = (cfg.output_topic, cfg.dlq_topic)
    found: dict[str, int] = {}
    for name in topics:
        try:
            resource = ConfigResource(ConfigResourceType.TOPIC, name, ["max.message.bytes"])
            described = admin.describe_configs([resource], config_filter="all")
            found[name] = int(described["topic"][name]["max.message.bytes"]["value"])
        except Exception as e:  # best effort: see the docstring
            log.info("max.message.bytes of %r not read (%s); using the producer's %d bytes",
                     name, type(e).__name__, max_request_size(cfg))  # fmt: skip
    return SizeLimits(
        output=min(limits.output, found.get(cfg.output_topic, limits.output)),
        dead_letter=min(limits.dead_letter, found.get(cfg.dlq_topic, limits.dead_letter)),
    )


# Produce errors that are about one record, not the broker or the cluster: the same record would
# fail again on any broker, so it is dead-lettered and the stream goes on. Client-side refusals
# (kafka-python raises ValueError, TypeError or AssertionError for a record it cannot encode) are
# of the same kind. Every other error (timeouts, authorization, unknown topic, a closed
# producer...) stops the worker without committing past the record.
_RECORD_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidRecordError,
    kafka_errors.InvalidTimestampError,
    kafka_errors.CorruptRecordError,
    ValueError,
    TypeError,
    AssertionError,
)
_SIZE_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
)


def is_record_error(error: BaseException | None) -> bool:
    """Whether a produce error is deterministic for the one record (see ``_RECORD_ERRORS``)."""
    return isinstance(error, _RECORD_ERRORS)


def is_size_error(error: BaseException | None) -> bool:
    """Whether a produce error says the record is too large for the producer or the topic."""
    return isinstance(error, _SIZE_ERRORS)


def offset_request(offsets: dict[tuple[str, int], int]) -> dict[KafkaTP, OffsetAndMetadata]:
    """Offsets to commit (the next offset to read, per partition) as kafka-python takes them."""
    return {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


class ConsumerLike(Protocol):
    """Every call of kafka-python's KafkaConsumer that `InputConsumer` makes; the tests' in-memory
    consumer implements the same."""

    def subscribe(self, topics: list[str], listener: Any = None) -> None: ...
    def topics(self) -> set[str]: ...
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict: ...
    def pause(self, *partitions: Any) -> None: ...
    def resume(self, *partitions: Any) -> None: ...
    def assignment(self) -> set: ...
    def seek(self, partition: Any, offset: int) -> None: ...
    def position(self, partition: Any, timeout_ms: int | None = None) -> int | None: ...
    def highwater(self, partition: Any) -> int | None: ...
    def commit(self, offsets: dict | None = None) -> None: ...
    def group_metadata(self) -> Any: ...
    def commit_async(self, offsets: dict | None = None, callback: Any = None) -> Any: ...
    def close(self, autocommit: bool = True) -> None: ...


class InputConsumer:
    """The worker's consumer: partitions as ``(topic, partition)`` tuples, offsets as ints.

    Wraps a KafkaConsumer (or the tests' stand-in). The owner thread is the one that calls
    `subscribe`; kafka-python 3 may run the rebalance listener on its own I/O thread instead, and
    `commit` deals with that.
    """

    def __init__(self, consumer: ConsumerLike) -> None:
        self.client = consumer
        self._owner: threading.Thread | None = None

    def subscribe(self, topic: str, listener: Any) -> None:
        """Join the group for `topic`; `listener` gets the revokes and assignments.

        The topic's metadata is fetched before the first poll: a join that races it can leave
        kafka-python's group leader without partitions.
        """
        self._owner = threading.current_thread()
        self.client.subscribe([topic], listener=listener)
        self.client.topics()

    def poll(self, timeout_ms: int, max_records: int) -> Iterable[Any]:
        """The records fetched, partition after partition."""
        for records in self.client.poll(timeout_ms=timeout_ms, max_records=max_records).values():
            yield from records

    def assignment(self) -> list[KafkaTP]:
        """The partitions assigned to this consumer now."""
        return list(self.client.assignment())

    def pause(self, partitions: Iterable[Any] | None = None) -> int:
        """Pause `partitions` (default: every assigned one); returns how many."""
        tps = self.assignment() if partitions is None else list(partitions)
        if tps:
            self.client.pause(*tps)
        return len(tps)

    def resume(self) -> int:
        """Resume every assigned partition; returns how many."""
        tps = self.assignment()
        if tps:
            self.client.resume(*tps)
        return len(tps)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit `offsets` (the next offset to read, per partition); raises what the client
        raises (a rebalance in progress, say)."""
        request = offset_request(offsets)
        if self._owner is not None and threading.current_thread() is not self._owner:
            # kafka-python 3 runs the rebalance listener on the consumer's own I/O thread, where a
            # blocking commit is refused ("Cannot block on net.run() from the IO thread"): the
            # commit is sent without waiting; it goes out ahead of the rejoin.
            self.client.commit_async(request)
        else:
            self.client.commit(request)

    def group_metadata(self) -> Any:
        """The consumer's group membership (group, generation, member id) for
        `send_offsets_to_transaction`: the broker refuses offsets sent under a generation that
        has ended (KIP-447), which is what fences a worker expelled from the group."""
        return self.client.group_metadata()

    def rewind(self, tp: tuple[str, int], offset: int) -> None:
        """Seek a partition back to `offset`, so that the records from there are read again.

        kafka-python 2.x restarts a reassigned partition from its committed offset, but 3.x keeps
        the fetch position of a partition that the next assignment gives back to this consumer:
        without this seek, work dropped on a revoke would be skipped for good. A partition no
        longer assigned (membership lost) has nothing to rewind.
        """
        try:
            self.client.seek(KafkaTP(*tp), offset)
        except Exception as e:
            log.debug("no rewind of %s/%d: %s", tp[0], tp[1], e)

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the end of each assigned partition whose position and end are known."""
        lags = {}
        for tp in self.assignment():
            try:
                end, pos = self.client.highwater(tp), self.client.position(tp, timeout_ms=100)
            except Exception:  # position unknown yet: skip this round
                continue
            if end is not None and pos is not None:
                lags[(tp.topic, tp.partition)] = max(0, end - pos)
        return lags

    def close(self) -> None:
        """Leave the group without committing (commits are the worker's alone)."""
        self.client.close(autocommit=False)
