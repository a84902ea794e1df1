"""`ner-stream run` against a SASL_SSL broker with ACLs: the secure mode of deploy/kafka/kafka.sh
(SCRAM-SHA-512 over TLS, the StandardAuthorizer; see deploy/kafka/README.md).

The worker runs as the SCRAM user `ner-stream` holding only the ACLs of deploy/kafka/acls.py; the
tests set up topics, records and ACLs as the super user `admin`. What they check:

- the worker runs end to end with exactly those ACLs, at least once and exactly once;
- a wrong password ends the start at once with exit code 3 and one sentence;
- a missing ACL (input READ, group READ, output WRITE) ends with exit code 1 and one sentence,
  commits nothing, and once the ACL is granted a restarted worker answers every document;
- the broker's certificate is checked against the host name connected to, and against the CA;
- the password reaches neither the log (at DEBUG) nor /metrics nor `--help`.

The session fixture starts the secure broker (port 9192, state in deploy/kafka/.state-secure;
SECURE_KAFKA_PORT and SECURE_KAFKA_STATE_DIR override them) unless it already runs, and then stops
it again at the end; a broker it did not start is left running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.net.transport import KafkaSSLTransport

from ner_stream.config import WorkerConfig
from ner_stream.kafka_io import StartupError, connect_admin
from tests import kafka_util
from tests.integration import worker_util as wu
from tests.integration.worker_util import Topics

pytestmark = pytest.mark.integration

PARTITIONS = 2
DOCS = 30
START_TIMEOUT_S = 90  # import torch, load the model, connect over TLS, join the group
OUTPUT_TIMEOUT_S = 90
SHUTDOWN_TIMEOUT_S = 10.0


def _load_acls() -> ModuleType:
    """deploy/kafka/acls.py, the ACL set the docs tell operators to grant (not a package)."""
    path = kafka_util.REPO_ROOT / "deploy" / "kafka" / "acls.py"
    spec = importlib.util.spec_from_file_location("ner_stream_deploy_acls", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


acls = _load_acls()


# ------------------------------------------------------------------------------------ the broker


@dataclass(frozen=True)
class SecureBroker:
    """The running secure broker: where it listens and where its CA and passwords are."""

    bootstrap: str
    state_dir: Path

    @property
    def ca(self) -> Path:
        return self.state_dir / "secure" / "ca.pem"

    def password(self, user: str) -> str:
        return (self.state_dir / "secure" / f"{user}.password").read_text().strip()

    def client(self, user: str = "admin") -> dict[str, Any]:
        """kafka-python settings to connect as `user`."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user,
            "sasl_plain_password": self.password(user),
            "ssl_cafile": str(self.ca),
        }


def _kafka_sh(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kafka_util.KAFKA_SH), command],
        capture_output=True,
        text=True,
        timeout=kafka_util.KAFKA_SH_TIMEOUT_S,
        env={**os.environ, **env},
        check=False,
    )


@pytest.fixture(scope="session")
def secure_broker() -> Iterator[SecureBroker]:
    """The secure local broker; started here (and stopped at the end) only when not running."""
    port = os.environ.get("SECURE_KAFKA_PORT", "9192")
    state_dir = Path(
        os.environ.get("SECURE_KAFKA_STATE_DIR")
        or kafka_util.REPO_ROOT / "deploy" / "kafka" / ".state-secure"
    )
    # Set explicitly: a KAFKA_PORT or KAFKA_STATE_DIR meant for the plain broker must not apply.
    env = {"KAFKA_SECURE": "1", "KAFKA_PORT": port, "KAFKA_STATE_DIR": str(state_dir)}
    started = False
    if _kafka_sh("status", env).returncode != 0:
        result = _kafka_sh("up", env)
        if result.returncode != 0:
            pytest.fail(f"KAFKA_SECURE=1 kafka.sh up failed:\n{result.stderr}", pytrace=False)
        started = True
    try:
        yield SecureBroker(f"127.0.0.1:{port}", state_dir)
    finally:
        if started:
            _kafka_sh("down", env)


@pytest.fixture(scope="session")
def secure_admin(secure_broker: SecureBroker) -> Iterator[KafkaAdminClient]:
    admin = KafkaAdminClient(
        bootstrap_servers=secure_broker.bootstrap,
        request_timeout_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS,
        **secure_broker.client("admin"),
    )
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture
def secure_topics(secure_admin: KafkaAdminClient) -> Iterator[Topics]:
    """Fresh input, output and dead-letter topics (made as admin) and a group name."""
    topics = Topics(
        input=kafka_util.unique_name("sec-docs"),
        output=kafka_util.unique_name("sec-ents"),
        dlq=kafka_util.unique_name("sec-dlq"),
        group=kafka_util.unique_name("sec-group"),
    )
    for name, partitions in ((topics.input, PARTITIONS), (topics.output, PARTITIONS),
                             (topics.dlq, 1)):  # fmt: skip
        kafka_util.create_topic(secure_admin, name, partitions)
    yield topics
    # Deleting a topic leaves its ACLs behind: both go. A failed clean-up must not turn a passed
    # test into an error.
    with contextlib.suppress(Exception):
        acls.revoke(secure_admin, acls.worker_acls(topics.group, topics.input, topics.output,
                                                   topics.dlq, exactly_once=True))  # fmt: skip
    with contextlib.suppress(Exception):
        secure_admin.delete_topics([topics.input, topics.output, topics.dlq])


def grant(admin: KafkaAdminClient, topics: Topics, *parts: str, exactly_once: bool = False):
    """Grant `ner-stream` these parts of its ACL set (deploy/kafka/acls.py)."""
    acls.grant(admin, acls.worker_acls(topics.group, topics.input, topics.output, topics.dlq,
                                       exactly_once=exactly_once, parts=parts))  # fmt: skip


def produce_docs(broker: SecureBroker, topic: str, n: int = DOCS) -> list[str]:
    """Produce `n` documents as admin; returns their ids."""
    ids = [f"doc-{i}" for i in range(n)]
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap,
        acks="all",
        request_timeout_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS,
        **broker.client("admin"),
    )
    try:
        wu.produce_records(broker.bootstrap, topic, wu.doc_records(ids), producer=producer)
    finally:
        producer.close(timeout=10)
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def start_secure_worker(
    secure_broker: SecureBroker, tiny_model: Path, tmp_path: Path
) -> Iterator[Callable[..., wu.WorkerProcess]]:
    """``start(name, topics, password=None, **flags)``: `ner-stream run` as the SCRAM user
    ner-stream over SASL_SSL (the password from the environment, as a Kubernetes Secret gives
    it). Flags as keyword arguments (None drops one, True is a bare switch). Every worker still
    running at teardown is SIGKILLed by pid."""
    started: list[wu.WorkerProcess] = []

    def start(name: str, topics: Topics, password: str | None = None, **flags) -> wu.WorkerProcess:
        settings: dict[str, Any] = {
            "bootstrap_servers": secure_broker.bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "ner-stream",
            "ssl_cafile": str(secure_broker.ca),
            "input_topic": topics.input,
            "output_topic": topics.output,
            "dlq_topic": topics.dlq,
            "group_id": topics.group,
            "model": str(tiny_model),
            "device": "cpu",
            "metrics_port": 0,
            "commit_interval_ms": 200,
            "session_timeout_ms": 10000,
            "shutdown_timeout_s": SHUTDOWN_TIMEOUT_S,
            "connect_timeout_s": 20,
            "max_chunk_tokens": 16,
            **flags,
        }
        args: list[str] = []
        for key, value in settings.items():
            if value is None:
                continue
            args.append("--" + key.replace("_", "-"))
            if value is not True:
                args.append(str(value))
        env = {"NER_STREAM_SASL_PASSWORD": password or secure_broker.password("ner-stream")}
        worker = wu.WorkerProcess(name, args, tmp_path / f"worker-{name}.log", env=env).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def wait_for_outputs(
    broker: SecureBroker,
    topics: Topics,
    ids: list[str],
    worker: wu.WorkerProcess,
    isolation: str = "read_uncommitted",
) -> wu.TopicReader:
    """Read the output topic as admin until every id has an output; returns the reader (open:
    the caller reads on or closes it)."""
    reader = wu.TopicReader(broker.bootstrap, topics.output, json_ids=True, isolation=isolation,
                            client=broker.client("admin"))  # fmt: skip
    wu.wait_for(lambda: all(i in reader.ids for i in ids), OUTPUT_TIMEOUT_S,
                wu.ids_progress(reader, ids), [worker], tick=lambda: reader.poll(200))  # fmt: skip
    return reader


def fatal_lines(worker: wu.WorkerProcess) -> list[str]:
    """The worker's ERROR lines of its own (not kafka-python's) and its `ner-stream:` lines."""
    return [
        line
        for line in worker.log().splitlines()
        if line.startswith("ner-stream:") or ("ERROR" in line and " ner_stream" in line)
    ]


# ------------------------------------------------------------------------------------ (a), (e)


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_the_worker_runs_over_sasl_ssl_with_only_its_acls_and_shows_no_secret(
    secure_broker, secure_admin, secure_topics, start_secure_worker, guarantee
):
    exactly_once = guarantee == "exactly-once"
    grant(secure_admin, secure_topics, *acls.PARTS, exactly_once=exactly_once)
    ids = produce_docs(secure_broker, secure_topics.input)
    port = free_port()
    extra = {"processing_guarantee": guarantee, "instance_id": "w-0"} if exactly_once else {}
    # DEBUG: the most the worker ever logs, and still no password in it.
    worker = start_secure_worker(guarantee, secure_topics, metrics_port=port, log_level="DEBUG",
                                 **extra)  # fmt: skip
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    reader = wait_for_outputs(secure_broker, secure_topics, ids, worker, isolation)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    worker.signal(signal.SIGTERM)
    assert worker.wait(SHUTDOWN_TIMEOUT_S + 20) == 0, worker.tail()
    try:
        reader.read_to_end()
    finally:
        reader.close()
    assert set(reader.ids) == set(ids)
    if exactly_once:
        assert all(n == 1 for n in reader.ids.values()), reader.ids
    committed = wu.committed_offsets(secure_broker.bootstrap, secure_topics.group,
                                     secure_topics.input, PARTITIONS,
                                     client=secure_broker.client("admin"))  # fmt: skip
    assert sum(committed.values()) == DOCS
    password = secure_broker.password("ner-stream")
    assert 'ner_stream_documents_total{outcome="ok"}' in metrics
    assert password not in metrics
    log = worker.log()
    assert "'sasl_password': '***'" in log  # the settings line is there, masked
    assert password not in log


def _cli(broker: SecureBroker, user: str, *args: str, password: str | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`ner-stream ARGS` as `user` over SASL_SSL, the password from the environment."""
    flags = ["--bootstrap-servers", broker.bootstrap, "--security-protocol", "SASL_SSL",
             "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", user,
             "--ssl-cafile", str(broker.ca), "--connect-timeout-s", "20"]  # fmt: skip
    env = {**os.environ, "NER_STREAM_SASL_PASSWORD": password or broker.password(user)}
    return subprocess.run([wu.ner_stream_executable(), *args, *flags], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120,
                          check=False)  # fmt: skip


def test_produce_and_consume_work_over_sasl_ssl_around_a_worker(
    secure_broker, secure_admin, secure_topics, start_secure_worker
):
    """The README's flow on a secure broker: produce as one user, the worker as `ner-stream`
    with its ACLs, consume as another user."""
    grant(secure_admin, secure_topics, *acls.PARTS)
    lines = "".join(f'{{"id": "doc-{i}", "text": "Peter went to Paris ."}}\n' for i in range(5))
    produced = _cli(secure_broker, "admin", "produce", "--topic", secure_topics.input,
                    stdin=lines)  # fmt: skip
    assert produced.returncode == 0, produced.stderr
    assert "sent 5 documents" in produced.stderr
    worker = start_secure_worker("cli", secure_topics)
    wait_for_outputs(secure_broker, secure_topics, [f"doc-{i}" for i in range(5)], worker).close()
    consumed = _cli(secure_broker, "admin", "consume", "--topic", secure_topics.output,
                    "--idle-timeout-s", "3")  # fmt: skip
    assert consumed.returncode == 0, consumed.stderr
    assert sorted(json.loads(line)["id"] for line in consumed.stdout.splitlines()) == [
        f"doc-{i}" for i in range(5)
    ]
    wrong = _cli(secure_broker, "admin", "consume", "--topic", secure_topics.output,
                 password="not-the-password")  # fmt: skip
    assert wrong.returncode == 3
    # The broker's refusal itself, at once: no retries before it.
    assert wrong.stderr.strip().splitlines() == [
        f"Error: Kafka at {secure_broker.bootstrap} refused the credentials of SASL user "
        "'admin' (SCRAM-SHA-512): check --sasl-username, --sasl-password and --sasl-mechanism"
    ]
    assert "not-the-password" not in wrong.stdout + wrong.stderr


def test_run_help_shows_no_password_from_the_environment(secure_broker):
    password = secure_broker.password("ner-stream")
    env = {**os.environ, "NER_STREAM_SASL_PASSWORD": password}
    result = subprocess.run([wu.ner_stream_executable(), "run", "--help"], capture_output=True,
                            text=True, env=env, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "NER_STREAM_SASL_PASSWORD" in result.stdout
    assert password not in result.stdout + result.stderr


# ------------------------------------------------------------------------------------ (b)


def test_a_wrong_password_exits_3_at_once_with_one_sentence(
    secure_broker, secure_topics, start_secure_worker
):
    wrong = "not-the-password-" + secure_broker.password("ner-stream")[:4]
    t0 = time.monotonic()
    # A long connect timeout: a wrong password must not be retried until it runs out.
    worker = start_secure_worker("wrong-password", secure_topics, password=wrong,
                                 connect_timeout_s=300)  # fmt: skip
    code = worker.wait(START_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    log = worker.log()
    assert code == 3, log
    assert elapsed < START_TIMEOUT_S
    sentence = (
        f"Kafka at {secure_broker.bootstrap} refused the credentials of SASL user 'ner-stream' "
        "(SCRAM-SHA-512): check --sasl-username, --sasl-password and --sasl-mechanism"
    )
    assert [line for line in log.splitlines() if line.startswith("ner-stream:")] == [
        f"ner-stream: {sentence}"
    ]
    # kafka-python's own lines about the failed attempts are not repeated in the log.
    assert " kafka." not in log and "Traceback" not in log
    assert wrong not in log


def test_a_wrong_password_is_named_when_the_refusal_and_the_close_are_read_together(
    secure_broker, monkeypatch
):
    # The broker closes a refused connection 100 ms after its answer; a client that reads later
    # than that (a loaded machine) gets both in one read. Reading 300 ms late makes that happen
    # on every connection: the refusal must still be read, not retried as "socket disconnected".
    late = KafkaSSLTransport._sock_recv

    def read_late(transport):
        time.sleep(0.3)
        return late(transport)

    monkeypatch.setattr(KafkaSSLTransport, "_sock_recv", read_late)
    cfg = WorkerConfig(bootstrap_servers=secure_broker.bootstrap, security_protocol="SASL_SSL",
                       sasl_mechanism="SCRAM-SHA-512", sasl_username="ner-stream",
                       sasl_password="not-the-password", ssl_cafile=str(secure_broker.ca),
                       connect_timeout_s=120)  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(StartupError) as raised:
        connect_admin(cfg)
    assert raised.value.exit_code == 3
    assert str(raised.value) == (
        f"Kafka at {secure_broker.bootstrap} refused the credentials of SASL user 'ner-stream' "
        "(SCRAM-SHA-512): check --sasl-username, --sasl-password and --sasl-mechanism"
    )
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------------ (c)

MISSING = {
    "input": "READ on the input topic {input!r}",
    "group": "READ on the consumer group {group!r}",
    "output": "WRITE on the output topic {output!r}",
}


@pytest.mark.parametrize("missing", list(MISSING))
def test_a_missing_acl_exits_1_commits_nothing_and_loses_nothing_once_granted(
    secure_broker, secure_admin, secure_topics, start_secure_worker, missing
):
    topics = secure_topics
    grant(secure_admin, topics, *(p for p in ("group", "input", "output", "dlq") if p != missing))
    ids = produce_docs(secure_broker, topics.input)
    worker = start_secure_worker(f"without-{missing}", topics)
    code = worker.wait(START_TIMEOUT_S)
    assert code == 1, worker.tail()
    wanted = (
        f"Kafka at {secure_broker.bootstrap} refused SASL user 'ner-stream' "
        f"{MISSING[missing].format(**vars(topics))}: add the missing ACL"
    )
    lines = fatal_lines(worker)
    assert lines and lines[-1].endswith(wanted), "\n".join(lines)
    # One line of the worker's for the first refused record at most, then the one that says why.
    assert len([line for line in lines if "ERROR" in line]) <= 2, "\n".join(lines)
    assert "Traceback" not in worker.log()
    admin_client = secure_broker.client("admin")
    assert wu.committed_offsets(secure_broker.bootstrap, topics.group, topics.input, PARTITIONS,
                                client=admin_client) == {}  # fmt: skip
    with wu.TopicReader(secure_broker.bootstrap, topics.output, client=admin_client) as reader:
        assert reader.read_to_end() == []

    grant(secure_admin, topics, missing)
    again = start_secure_worker(f"with-{missing}", topics)
    reader = wait_for_outputs(secure_broker, topics, ids, again)
    reader.close()
    again.signal(signal.SIGTERM)
    assert again.wait(SHUTDOWN_TIMEOUT_S + 20) == 0, again.tail()


def test_read_revoked_while_running_stops_the_worker_and_loses_nothing_once_granted(
    secure_broker, secure_admin, secure_topics, start_secure_worker
):
    topics = secure_topics
    grant(secure_admin, topics, "group", "input", "output", "dlq")
    worker = start_secure_worker("revoked", topics)
    first = produce_docs(secure_broker, topics.input)
    wait_for_outputs(secure_broker, topics, first, worker).close()
    acls.revoke(secure_admin, acls.worker_acls(topics.group, topics.input, topics.output,
                                               topics.dlq, parts=("input",)))  # fmt: skip
    ids = [f"late-{i}" for i in range(DOCS)]
    producer = KafkaProducer(bootstrap_servers=secure_broker.bootstrap, acks="all",
                             **secure_broker.client("admin"))  # fmt: skip
    try:
        wu.produce_records(secure_broker.bootstrap, topics.input, wu.doc_records(ids),
                           producer=producer)  # fmt: skip
    finally:
        producer.close(timeout=10)
    # Waiting does not bring the ACL back: the worker says so and stops, as at start.
    code = worker.wait(START_TIMEOUT_S)
    assert code == 1, worker.tail()
    lines = fatal_lines(worker)
    wanted = MISSING["input"].format(**vars(topics)) + ": add the missing ACL"
    assert lines and lines[-1].endswith(wanted), "\n".join(lines)
    grant(secure_admin, topics, "input")
    again = start_secure_worker("re-granted", topics)
    wait_for_outputs(secure_broker, topics, ids, again).close()
    again.signal(signal.SIGTERM)
    assert again.wait(SHUTDOWN_TIMEOUT_S + 20) == 0, again.tail()


# ------------------------------------------------------------------------------------ (d)


class Forwarder:
    """A TCP forwarder from `host` (a port of its own) to the broker: the broker answers with its
    own certificate, which does not name `host`."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.socket()
        self.server.bind((host, 0))
        self.server.listen()
        bound_host, bound_port = self.server.getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


def test_the_broker_certificate_is_checked_against_the_host_name_by_default(
    secure_broker, secure_topics, start_secure_worker
):
    host, port = secure_broker.bootstrap.rsplit(":", 1)
    try:
        # Another loopback address (Linux routes all of 127/8 to lo): the right broker and CA,
        # reached under a name its certificate does not carry.
        forwarder = Forwarder("127.0.0.2", (host, int(port)))
    except OSError as e:
        pytest.skip(f"cannot listen on 127.0.0.2 here: {e}")
    try:
        # The same CA and broker under a name the certificate carries: accepted.
        cfg = WorkerConfig(bootstrap_servers=f"localhost:{port}", security_protocol="SASL_SSL",
                           sasl_mechanism="SCRAM-SHA-512", sasl_username="ner-stream",
                           sasl_password=secure_broker.password("ner-stream"),
                           ssl_cafile=str(secure_broker.ca), connect_timeout_s=20)  # fmt: skip
        connect_admin(cfg).close()
        worker = start_secure_worker("wrong-host", secure_topics,
                                     bootstrap_servers=forwarder.address,
                                     connect_timeout_s=300)  # fmt: skip
        code = worker.wait(START_TIMEOUT_S)
    finally:
        forwarder.close()
    assert code == 3, worker.tail()
    [line] = [line for line in worker.log().splitlines() if line.startswith("ner-stream:")]
    assert line.startswith(f"ner-stream: the TLS certificate of Kafka at {forwarder.address} was "
                           "not accepted (")  # fmt: skip
    assert "127.0.0.2" in line and "check --ssl-cafile" in line


def test_a_broker_certificate_from_another_ca_is_refused(secure_broker):
    # The system's CAs instead of the throwaway one: the right name, the wrong issuer.
    cfg = WorkerConfig(bootstrap_servers=secure_broker.bootstrap, security_protocol="SASL_SSL",
                       sasl_mechanism="SCRAM-SHA-512", sasl_username="ner-stream",
                       sasl_password=secure_broker.password("ner-stream"),
                       connect_timeout_s=60)  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(StartupError) as raised:
        connect_admin(cfg)
    assert time.monotonic() - t0 < 30
    assert raised.value.exit_code == 3
    assert str(raised.value).startswith(
        f"the TLS certificate of Kafka at {secure_broker.bootstrap} was not accepted ("
    )
