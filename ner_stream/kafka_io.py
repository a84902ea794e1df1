"""The Kafka shell: building the clients, waiting for the broker, checking or creating topics, and
`InputConsumer`, the one place that knows how kafka-python's consumer behaves across versions."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.net import transport as kafka_transport
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from ner_stream.config import WorkerConfig

log = logging.getLogger(__name__)


def _deliver_before_close(sock_recv):
    """Wrap a kafka-python transport's ``_sock_recv`` (returns ``(bytes, error or None)``) so
    that bytes read in the same call as the peer's close are handed over first.

    kafka-python 3.0.12 drops them: its read loop aborts on the error before passing the bytes
    on. A broker that refuses SASL credentials answers with the reason and closes the connection
    `connection.failed.authentication.delay.ms` (100 ms by default) later; a client that reads
    later than that, as a loaded machine does, got both in one call and saw only "socket
    disconnected", so a wrong password was retried as an unreachable broker. Returning the
    bytes without the error lets the loop deliver them; its next read finds the close again.
    """

    @functools.wraps(sock_recv)
    def recv(self):
        data, err = sock_recv(self)
        return (data, None) if data and err is not None else (data, err)

    recv.delivers_before_close = True
    return recv


def _patch_transports() -> None:
    """Apply `_deliver_before_close` to kafka-python's TCP and TLS transports, once."""
    for cls in (kafka_transport.KafkaTCPTransport, kafka_transport.KafkaSSLTransport):
        own = vars(cls).get("_sock_recv")
        if own is not None and not getattr(own, "delivers_before_close", False):
            cls._sock_recv = _deliver_before_close(own)


_patch_transports()


class StartupError(Exception):
    """A configuration or environment problem found at start; the message is one sentence."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _error_text(error: BaseException) -> str:
    """``Type: message`` of an error, without kafka-python's ``[Error N]`` prefix."""
    text = re.sub(r"^\[Error -?\d+\] ", "", str(error))
    name = type(error).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def _names(error: BaseException) -> set[str]:
    """The topic or group names an authorization error carries (kafka-python passes one name
    or a set of them)."""
    out: set[str] = set()
    for arg in error.args:
        if isinstance(arg, str):
            out.add(arg)
        elif isinstance(arg, set | frozenset | list | tuple):
            out.update(a for a in arg if isinstance(a, str))
    return out


def tls_verify_failure(error: BaseException) -> str | None:
    """Why the broker's certificate was not accepted ("IP address mismatch, certificate is not
    valid for '127.0.0.2'"), when `error` is such a failure; else None."""
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" not in text:
        return None
    reason = text.split("certificate verify failed:", 1)[-1]
    return reason.split("(_ssl.c", 1)[0].strip().rstrip(".") or "certificate verify failed"


def is_refusal(error: BaseException | None) -> bool:
    """Whether Kafka refused this client for good rather than being out of reach: its
    credentials, its certificate check or its permissions. Retrying does not help."""
    return isinstance(
        error,
        kafka_errors.SaslAuthenticationFailedError
        | kafka_errors.UnsupportedSaslMechanismError
        | kafka_errors.AuthorizationError,
    ) or (error is not None and tls_verify_failure(error) is not None)


def explain(error: BaseException, cfg: WorkerConfig) -> str:
    """One sentence for an error of the Kafka clients, naming what to change when Kafka refused
    the worker (credentials, the broker's certificate, a missing ACL); other errors as
    ``Type: message``."""
    who = f"SASL user {cfg.sasl_username!r}" if cfg.sasl_username else "this worker's principal"
    at = f"Kafka at {cfg.bootstrap_servers}"
    if isinstance(error, kafka_errors.SaslAuthenticationFailedError):
        return (
            f"{at} refused the credentials of {who} ({cfg.sasl_mechanism}): check "
            "--sasl-username, --sasl-password and --sasl-mechanism"
        )
    if isinstance(error, kafka_errors.UnsupportedSaslMechanismError):
        detail = _error_text(error)
        detail = "" if detail == type(error).__name__ else f" ({detail})"
        return f"{at} does not accept --sasl-mechanism {cfg.sasl_mechanism}{detail}"
    reason = tls_verify_failure(error)
    if reason is not None:
        return (
            f"the TLS certificate of {at} was not accepted ({reason}): check --ssl-cafile, and "
            "that the certificate names the host of --bootstrap-servers"
        )
    if not isinstance(error, kafka_errors.AuthorizationError):
        return _error_text(error)
    refused = f"{at} refused {who}"
    if isinstance(error, kafka_errors.TopicAuthorizationFailedError):
        names = _names(error)
        roles = (
            ("READ on the input topic", cfg.input_topic),
            ("WRITE on the output topic", cfg.output_topic),
            ("WRITE on the dead-letter topic", cfg.dlq_topic),
        )
        needs = [f"{what} {topic!r}" for what, topic in roles if topic in names]
        if not needs:
            needs = [f"access to the topics {sorted(names)}" if names else "access to a topic"]
        acls = "ACLs" if len(needs) > 1 else "ACL"
        return f"{refused} {' and '.join(needs)}: add the missing {acls}"
    if isinstance(error, kafka_errors.GroupAuthorizationFailedError):
        return f"{refused} READ on the consumer group {cfg.group_id!r}: add the missing ACL"
    if isinstance(error, kafka_errors.TransactionalIdAuthorizationFailedError):
        prefix = f"{cfg.group_id}-"
        return (
            f"{refused} WRITE on the transactional id {cfg.transactional_id()!r}: add an ACL "
            f"allowing WRITE on the transactional ids prefixed {prefix!r}"
        )
    if isinstance(error, kafka_errors.ClusterAuthorizationFailedError):
        # What the idempotent producer gets when it may write to no topic at all (KIP-679).
        return (
            f"{refused} a cluster operation ({_error_text(error)}): the worker needs WRITE on "
            "the output and dead-letter topics"
        )
    return f"{refused} an operation ({_error_text(error)})"


class _ConnectErrors(logging.Handler):
    """The errors kafka-python logs while the admin client bootstraps, kept instead of printed.

    Its bootstrap retries every failed connection until the bootstrap timeout and then raises
    only ``KafkaTimeoutError``: why it failed (credentials refused, a certificate not accepted,
    a refused connection) is only in its log records, whose arguments hold the exceptions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args.values() if isinstance(record.args, dict) else record.args or ()
        self.errors.extend(a for a in args if isinstance(a, BaseException))

    @contextlib.contextmanager
    def capture(self):
        """Collect kafka-python's log records (WARNING and up, the worker's level for it) for
        the duration; the worker's own retry warnings and final error say what they said."""
        kafka_log = logging.getLogger("kafka")
        propagate = kafka_log.propagate
        kafka_log.addHandler(self)
        kafka_log.propagate = False
        try:
            yield self
        finally:
            kafka_log.propagate = propagate
            kafka_log.removeHandler(self)

    def cause(self, fallback: BaseException | None) -> BaseException | None:
        """The error to report: a refusal (see `is_refusal`) first, else the latest error of a
        connection (the bootstrap's own time-out, logged last, says nothing of why)."""
        seen = [*self.errors, *([fallback] if fallback is not None else [])]
        refusals = [e for e in seen if is_refusal(e)]
        causes = [e for e in self.errors if not isinstance(e, kafka_errors.KafkaTimeoutError)]
        return refusals[0] if refusals else causes[-1] if causes else fallback


def connect_admin(cfg: WorkerConfig) -> KafkaAdminClient:
    """An admin client, retried with exponential backoff for up to `connect_timeout_s`.

    Raises `StartupError` with exit code 3 when the time is up, and at once when Kafka refuses
    the credentials or the broker's certificate is not accepted (a retry would not change that).
    """
    deadline = time.monotonic() + cfg.connect_timeout_s
    delay = 0.25
    disconnects = 0  # attempts in a row that ended with the broker closing the connection
    while True:
        left = deadline - time.monotonic()
        errors = _ConnectErrors()
        last: Exception | None = None
        with errors.capture():
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
        cause = errors.cause(last)
        if is_refusal(cause):
            raise StartupError(explain(cause, cfg), exit_code=3)
        why = _error_text(cause) if cause is not None else "no answer"
        if cause is not None and not isinstance(cause, kafka_errors.KafkaTimeoutError):
            disconnects = disconnects + 1 if "disconnected" in why else 0
        left = deadline - time.monotonic()
        if left <= 0:
            # A broker that closes every connection of a SASL client may still be refusing its
            # credentials without saying so (an answer lost by a kafka-python older or newer
            # than the one `_deliver_before_close` mends).
            hint = (
                "; a broker that drops every connection of a SASL client is often refusing its "
                "credentials: check --sasl-username, --sasl-password and --sasl-mechanism"
                if disconnects and cfg.security_protocol.startswith("SASL")
                else ""
            )
            raise StartupError(
                f"cannot reach Kafka at {cfg.bootstrap_servers} after {cfg.connect_timeout_s:g} s "
                f"({why}){hint}",
                exit_code=3,
            )
        log.warning("Kafka at %s not reachable yet (%s); retrying in %.1f s",
                    cfg.bootstrap_servers, why, min(delay, left))  # fmt: skip
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
            try:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(new)
            except kafka_errors.AuthorizationError as e:
                raise StartupError(
                    f"Kafka at {cfg.bootstrap_servers} refused to create topics {missing} "
                    f"({_error_text(e)}): create them beforehand, or grant CREATE",
                    exit_code=1,
                ) from e
            log.info("created topics %s with %d partitions", missing, cfg.topic_partitions)
        return
    if cfg.input_topic not in existing:
        _check_input_access(admin, cfg)
        raise StartupError(
            f"input topic {cfg.input_topic!r} does not exist; create it or pass --create-topics"
        )
    for name in (cfg.output_topic, cfg.dlq_topic):
        if name not in existing:
            log.warning("topic %r does not exist yet; the broker must auto-create it", name)


def _check_input_access(admin: KafkaAdminClient, cfg: WorkerConfig) -> None:
    """Raise `StartupError` (exit code 1) when the input topic is missing from the topic list
    because the principal may not see it: Kafka lists only the topics one may DESCRIBE, and a
    consumer without READ on its topic would wait for records for ever."""
    try:
        (described,) = admin.describe_topics([cfg.input_topic])
    except Exception as e:  # the check only refines the message
        log.debug("describing %r failed: %s", cfg.input_topic, e)
        return
    if described.get("error_code") == kafka_errors.TopicAuthorizationFailedError.errno:
        error = kafka_errors.TopicAuthorizationFailedError(cfg.input_topic)
        raise StartupError(explain(error, cfg), exit_code=1)


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

    Raises `StartupError` when the transactions cannot be initialised: exit code 1 when the
    principal may not use the transactional id, else 3.
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
            if isinstance(e, kafka_errors.AuthorizationError):
                raise StartupError(explain(e, cfg), exit_code=1) from e
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
