"""Kafka refusing the worker: wrong credentials, a certificate not accepted, a missing ACL. Each
ends with one sentence that says what to change, and a refusal ends the start at once instead of
being retried until the connect timeout. No broker: kafka-python's admin client is replaced by
stand-ins that fail (and log) the way it does."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from kafka import errors as kafka_errors

from ner_stream import kafka_io
from ner_stream.config import WorkerConfig
from ner_stream.kafka_io import StartupError, connect_admin, ensure_topics, explain

PASSWORD = "hunter2-secret"
CFG = WorkerConfig(
    bootstrap_servers="broker:9093",
    input_topic="docs",
    output_topic="ents",
    dlq_topic="docs.dlq",
    group_id="ner",
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="ner-stream",
    sasl_password=PASSWORD,
    processing_guarantee="exactly-once",
    instance_id="w-0",
    connect_timeout_s=30,
)
# What kafka-python reports for a wrong password, and for a certificate that does not name the
# host connected to (its text, as Python's ssl module words it).
BAD_PASSWORD = kafka_errors.SaslAuthenticationFailedError(
    "SaslAuthenticationFailedError: Authentication failed during authentication due to invalid "
    "credentials with SASL mechanism SCRAM-SHA-512"
)
WRONG_HOST = kafka_errors.KafkaConnectionError(
    "Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address "
    "mismatch, certificate is not valid for '127.0.0.2'. (_ssl.c:1006)"
)


# ------------------------------------------------------------------------------ the sentences


@pytest.mark.parametrize(
    ("error", "wanted"),
    [
        (BAD_PASSWORD, "Kafka at broker:9093 refused the credentials of SASL user 'ner-stream' "
                       "(SCRAM-SHA-512): check --sasl-username, --sasl-password and "
                       "--sasl-mechanism"),
        (WRONG_HOST, "the TLS certificate of Kafka at broker:9093 was not accepted (IP address "
                     "mismatch, certificate is not valid for '127.0.0.2'): check --ssl-cafile, "
                     "and that the certificate names the host of --bootstrap-servers"),
        (kafka_errors.TopicAuthorizationFailedError({"docs"}),
         "Kafka at broker:9093 refused SASL user 'ner-stream' READ on the input topic 'docs': "
         "add the missing ACL"),
        (kafka_errors.TopicAuthorizationFailedError("ents"),
         "Kafka at broker:9093 refused SASL user 'ner-stream' WRITE on the output topic 'ents': "
         "add the missing ACL"),
        (kafka_errors.TopicAuthorizationFailedError({"ents", "docs.dlq"}),
         "Kafka at broker:9093 refused SASL user 'ner-stream' WRITE on the output topic 'ents' "
         "and WRITE on the dead-letter topic 'docs.dlq': add the missing ACLs"),
        (kafka_errors.GroupAuthorizationFailedError("ner"),
         "Kafka at broker:9093 refused SASL user 'ner-stream' READ on the consumer group 'ner': "
         "add the missing ACL"),
        (kafka_errors.TransactionalIdAuthorizationFailedError(),
         "Kafka at broker:9093 refused SASL user 'ner-stream' WRITE on the transactional id "
         "'ner-w-0': add an ACL allowing WRITE on the transactional ids prefixed 'ner-'"),
        (kafka_errors.ClusterAuthorizationFailedError(),
         "Kafka at broker:9093 refused SASL user 'ner-stream' a cluster operation "
         "(ClusterAuthorizationFailedError): the worker needs WRITE on the output and "
         "dead-letter topics"),
        (kafka_errors.UnsupportedSaslMechanismError(),
         "Kafka at broker:9093 does not accept --sasl-mechanism SCRAM-SHA-512"),
        (kafka_errors.KafkaTimeoutError("Unable to bootstrap from broker:9093"),
         "KafkaTimeoutError: Unable to bootstrap from broker:9093"),
    ],
)  # fmt: skip
def test_each_refusal_is_one_sentence_naming_what_to_change(error, wanted):
    assert explain(error, CFG) == wanted


def test_a_topic_the_worker_does_not_use_is_named_as_it_came():
    error = kafka_errors.TopicAuthorizationFailedError({"other"})
    assert explain(error, CFG).endswith("refused SASL user 'ner-stream' access to the topics "
                                        "['other']: add the missing ACL")  # fmt: skip


def test_without_sasl_the_sentence_speaks_of_the_workers_principal():
    cfg = WorkerConfig(security_protocol="SSL", ssl_cafile="ca.pem")
    error = kafka_errors.GroupAuthorizationFailedError("ner-stream")
    assert "refused this worker's principal READ on the consumer group" in explain(error, cfg)


def test_only_refusals_count_as_final():
    final = [BAD_PASSWORD, WRONG_HOST, kafka_errors.GroupAuthorizationFailedError("g"),
             kafka_errors.UnsupportedSaslMechanismError("PLAIN")]  # fmt: skip
    passing = [
        kafka_errors.KafkaConnectionError("socket disconnected"),
        kafka_errors.KafkaConnectionError(
            "Handshake failed: EOF occurred in violation of protocol"
        ),
        kafka_errors.KafkaTimeoutError("Unable to bootstrap"),
        ConnectionRefusedError(111, "Connection refused"),
        None,
    ]
    assert all(kafka_io.is_refusal(e) for e in final)
    assert not any(kafka_io.is_refusal(e) for e in passing)


# ------------------------------------------------------------------------------ connecting


class FailingAdmin:
    """Stands in for KafkaAdminClient: logs `errors` as kafka-python's bootstrap does (the
    exception among the record's arguments) and then raises its KafkaTimeoutError."""

    errors: list[BaseException] = []
    calls = 0

    def __init__(self, **config) -> None:
        type(self).calls += 1
        manager = logging.getLogger("kafka.net.manager")
        for error in self.errors:
            manager.warning("Bootstrap connection to %s failed: %s (backoff %.2f secs)",
                            "bootstrap-0", error, 0.1)  # fmt: skip
        raise kafka_errors.KafkaTimeoutError(
            f"Unable to bootstrap from {config['bootstrap_servers']}"
        )


@pytest.fixture
def failing_admin(monkeypatch) -> Iterator[type[FailingAdmin]]:
    monkeypatch.setattr(FailingAdmin, "calls", 0)
    monkeypatch.setattr(kafka_io, "KafkaAdminClient", FailingAdmin)
    monkeypatch.setattr(kafka_io.time, "sleep", lambda s: None)
    # As the worker's logging leaves it: kafka-python's warnings are emitted.
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.WARNING)
    yield FailingAdmin
    kafka_log.setLevel(level)


@pytest.mark.parametrize("error", [BAD_PASSWORD, WRONG_HOST], ids=["credentials", "certificate"])
def test_a_refusal_ends_the_start_at_once_with_exit_code_3(failing_admin, monkeypatch, caplog,
                                                           error):  # fmt: skip
    monkeypatch.setattr(failing_admin, "errors", [
        kafka_errors.KafkaConnectionError("socket disconnected"), error,
        kafka_errors.KafkaConnectionError("socket disconnected"),
    ])  # fmt: skip
    caplog.set_level(logging.DEBUG)
    t0 = time.monotonic()
    with pytest.raises(StartupError) as raised:
        connect_admin(CFG)
    assert time.monotonic() - t0 < 5  # not the 30 s of --connect-timeout-s
    assert failing_admin.calls == 1
    assert raised.value.exit_code == 3
    assert str(raised.value) == explain(error, CFG)
    # kafka-python's own lines about it are kept back: the sentence above says it once.
    assert not [r for r in caplog.records if r.name.startswith("kafka")]
    assert logging.getLogger("kafka").propagate
    assert PASSWORD not in caplog.text + str(raised.value)


def test_an_unreachable_broker_is_retried_until_the_timeout_naming_the_last_error(
    failing_admin, monkeypatch, caplog
):
    refused = kafka_errors.KafkaConnectionError("Connection refused")
    # kafka-python logs its own time-out last: not the reason to report.
    timeout = kafka_errors.KafkaTimeoutError("Unable to bootstrap from broker:9093")
    monkeypatch.setattr(failing_admin, "errors", [refused, timeout])
    clock = iter(range(0, 1000, 4))  # each attempt costs 4 s
    monkeypatch.setattr(kafka_io.time, "monotonic", lambda: float(next(clock)))
    cfg = WorkerConfig(bootstrap_servers="broker:9093", connect_timeout_s=10)
    with pytest.raises(StartupError) as raised:
        connect_admin(cfg)
    assert raised.value.exit_code == 3
    assert str(raised.value) == (
        "cannot reach Kafka at broker:9093 after 10 s (KafkaConnectionError: Connection refused)"
    )
    assert failing_admin.calls > 1
    retries = [r.getMessage() for r in caplog.records if r.name == "ner_stream.kafka_io"]
    assert retries and all("(KafkaConnectionError: Connection refused)" in m for m in retries)


def test_a_sasl_client_the_broker_keeps_dropping_is_told_to_check_its_credentials(
    failing_admin, monkeypatch
):
    """kafka-python often sees only the close of a refused SCRAM exchange, not the refusal."""
    dropped = kafka_errors.KafkaConnectionError("socket disconnected")
    monkeypatch.setattr(failing_admin, "errors", [dropped])
    clock = iter(range(0, 1000, 4))
    monkeypatch.setattr(kafka_io.time, "monotonic", lambda: float(next(clock)))
    plain = WorkerConfig(bootstrap_servers="b:9092", connect_timeout_s=10)
    for cfg, hinted in ((replace(CFG, connect_timeout_s=10), True), (plain, False)):
        with pytest.raises(StartupError) as raised:
            connect_admin(cfg)
        assert raised.value.exit_code == 3
        message = str(raised.value)
        assert message.startswith("cannot reach Kafka at ") and "socket disconnected" in message
        assert ("check --sasl-username, --sasl-password and --sasl-mechanism" in message) is hinted


# ------------------------------------------------------------------------------ topics


class Admin:
    """Stands in for KafkaAdminClient's topic calls; `described` is describe_topics' answer."""

    def __init__(self, topics: list[str], described_error: int = 0, create_error=None) -> None:
        self.topics = topics
        self.described_error = described_error
        self.create_error = create_error

    def list_topics(self) -> list[str]:
        return self.topics

    def describe_topics(self, names: list[str]) -> list[dict]:
        return [{"name": n, "error_code": self.described_error, "partitions": []} for n in names]

    def create_topics(self, new) -> None:
        if self.create_error is not None:
            raise self.create_error


def test_an_input_topic_the_principal_may_not_see_is_a_missing_acl_not_a_missing_topic():
    # Kafka lists only the topics one may describe: without READ the input topic is not listed.
    with pytest.raises(StartupError) as raised:
        ensure_topics(Admin(["ents", "docs.dlq"], described_error=29), CFG)
    assert raised.value.exit_code == 1
    assert str(raised.value) == (
        "Kafka at broker:9093 refused SASL user 'ner-stream' READ on the input topic 'docs': "
        "add the missing ACL"
    )


def test_an_input_topic_that_does_not_exist_is_still_a_configuration_error():
    with pytest.raises(StartupError) as raised:
        ensure_topics(Admin(["ents"], described_error=3), CFG)
    assert raised.value.exit_code == 2
    assert "input topic 'docs' does not exist" in str(raised.value)


def test_creating_topics_without_the_permission_says_so():
    cfg = WorkerConfig(create_topics=True, input_topic="docs", output_topic="ents",
                       dlq_topic="docs.dlq")  # fmt: skip
    admin = Admin([], create_error=kafka_errors.TopicAuthorizationFailedError({"docs"}))
    with pytest.raises(StartupError) as raised:
        ensure_topics(admin, cfg)
    assert raised.value.exit_code == 1
    assert "refused to create topics ['docs', 'ents', 'docs.dlq']" in str(raised.value)
