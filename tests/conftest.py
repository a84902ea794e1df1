"""Shared fixtures. Only `_interpreter_settings` is autouse: unit tests never touch a broker, and
only tests that ask for ``kafka_bootstrap`` (directly or through ``topic_factory``) get one."""

from __future__ import annotations

import gc
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import pytest
from kafka import KafkaAdminClient

from tests import kafka_util

# Image for the Docker path; the Confluent images are the ones testcontainers' KafkaContainer knows
# how to configure. Override with KAFKA_TEST_IMAGE.
DEFAULT_KAFKA_IMAGE = "confluentinc/cp-kafka:7.9.0"


def _kafka_container_class():
    # testcontainers >= 4.10 moved the module to testcontainers.community.kafka and left a
    # deprecated alias at testcontainers.kafka; older releases only have the alias.
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.kafka import KafkaContainer
    return KafkaContainer


@pytest.fixture(autouse=True)
def _interpreter_settings() -> Iterator[None]:
    """`ner-stream tag` and the worker tune the interpreter of the process they run in
    (`ner_stream.heap.settle`, the switch interval), this one under CliRunner: put back after
    each test, so that no test runs under another's settings."""
    thresholds, switch = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    sys.setswitchinterval(switch)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address ("host:port") of a running Kafka broker for this test session.

    In order of preference:

    1. ``KAFKA_BOOTSTRAP_SERVERS`` from the environment, used as given;
    2. the local broker of ``deploy/kafka/kafka.sh`` when it already runs (``make test`` starts it);
    3. a testcontainers Kafka container when a Docker engine answers;
    4. the local broker, started here and stopped again at the end of the session.
    """
    from_env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if from_env:
        yield from_env
        return

    # An already running local broker wins over Docker: `make test` started it for this run.
    if kafka_util.local_broker_running():
        yield kafka_util.local_bootstrap()
        return

    if kafka_util.docker_available():
        kafka_container = _kafka_container_class()
        image = os.environ.get("KAFKA_TEST_IMAGE", DEFAULT_KAFKA_IMAGE)
        with kafka_container(image).with_kraft() as container:
            yield container.get_bootstrap_server()
        return

    try:
        kafka_util.start_local_broker()
    except kafka_util.LocalBrokerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield kafka_util.local_bootstrap()
    finally:
        # Only this fixture started it, so only this fixture stops it.
        kafka_util.stop_local_broker()


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    """A KafkaAdminClient connected to ``kafka_bootstrap``, shared by the session."""
    admin = KafkaAdminClient(
        bootstrap_servers=kafka_bootstrap,
        request_timeout_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS,
    )
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture(scope="session")
def topic_factory(kafka_admin: KafkaAdminClient) -> Iterator[Callable[..., str]]:
    """Factory ``make(partitions=1, prefix="test", configs=None) -> name`` creating uniquely named
    topics (``configs``: topic configs such as ``{"max.message.bytes": "5242880"}``).

    Session-scoped so that module-scoped fixtures can use it too; every topic it created is deleted
    when the session ends.
    """
    created: list[str] = []

    def make(
        partitions: int = 1, prefix: str = "test", configs: dict[str, str] | None = None
    ) -> str:
        name = kafka_util.unique_name(prefix)
        kafka_util.create_topic(kafka_admin, name, partitions, configs=configs)
        created.append(name)
        return name

    yield make

    if created:
        try:
            kafka_admin.delete_topics(created)
        except Exception as exc:  # a failed clean-up must not turn passed tests into errors
            warnings.warn(f"could not delete test topics {created}: {exc}", stacklevel=1)
