"""Every setting of `ner-stream run`: name, type, help and environment in `SETTINGS`, the default
in `WorkerConfig`.

The CLI builds its flags from `SETTINGS`; each flag is also read from `NER_STREAM_<NAME>` (for
example `NER_STREAM_BOOTSTRAP_SERVERS`). `WorkerConfig` holds the resolved values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from ner_stream.precision import DEFAULT_MAX_F1_CHANGE, PRECISIONS
from ner_stream.text import LINE_BREAK_MODES

ENV_PREFIX = "NER_STREAM_"


@dataclass(frozen=True)
class Setting:
    """One configuration key."""

    name: str
    help: str
    type: Any = str
    secret: bool = False  # never printed in logs
    flag: bool = False  # a boolean switch (--x / --no-x)

    @property
    def default(self) -> Any:
        """The default, which `WorkerConfig` holds (one place for it)."""
        return next(f.default for f in fields(WorkerConfig) if f.name == self.name)

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("bootstrap_servers", "Kafka bootstrap servers, comma separated."),
    Setting("input_topic", "Topic the documents are read from."),
    Setting("output_topic", "Topic the entities are written to."),
    Setting("dlq_topic", "Dead-letter topic for input that cannot be tagged."),
    Setting("group_id", "Consumer group; workers in one group share partitions."),
    Setting("client_id", "Kafka client id prefix."),
    Setting("model", "Model file (default: the packaged English model)."),
    Setting("device", "auto (CUDA when present), cpu or cuda."),
    Setting(
        "precision",
        "Network precision: auto (bf16 on a CPU with native bf16 when the "
        "model's dev F1 allows), fp32, bf16 or fp16 (CUDA).",
    ),
    Setting(
        "max_f1_change",
        "Dev-F1 points a reduced precision may move (from the model "
        "file's measurement) to be used.",
        float,
    ),
    Setting("torch_threads", "CPU threads for the model (0: every core but one).", int),
    Setting("model_process", "On the CPU, run the model in a child process of its own.", flag=True),
    Setting("max_batch_docs", "Most documents in one micro-batch.", int),
    Setting("max_batch_tokens", "Most padded tokens in one forward pass.", int),
    Setting("max_wait_ms", "Longest wait for a batch to fill, from its first document.", int),
    Setting(
        "fetch_max_wait_ms",
        "Longest the broker holds a fetch while input trickles in; shorter lowers "
        "latency at light load, but an idle worker then polls more often.",
        int,
    ),
    Setting("max_doc_bytes", "Larger input values go to the dead-letter topic.", int),
    Setting("max_chunk_tokens", "Sentences longer than this are cut into windows.", int),
    Setting(
        "line_breaks",
        "Does a single line break end a sentence: auto (yes, unless it wraps prose), "
        "sentence (always) or space (never).",
    ),
    Setting("queue_docs", "Documents buffered between consuming and tagging.", int),
    Setting("commit_interval_ms", "How often acknowledged offsets are committed.", int),
    Setting("session_timeout_ms", "How long the group waits for a silent worker.", int),
    Setting("shutdown_timeout_s", "Bound on a graceful shutdown.", float),
    Setting("connect_timeout_s", "How long to retry an unreachable broker at start.", float),
    Setting("create_topics", "Create the input, output and dead-letter topics.", flag=True),
    Setting("topic_partitions", "Partitions of topics made by --create-topics.", int),
    Setting("security_protocol", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."),
    Setting("sasl_mechanism", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."),
    Setting("sasl_username", "SASL user name."),
    Setting("sasl_password", "SASL password.", secret=True),
    Setting("ssl_cafile", "CA certificate file (PEM)."),
    Setting("ssl_certfile", "Client certificate file (PEM)."),
    Setting("ssl_keyfile", "Client private key file (PEM)."),
    Setting("metrics_host", "Address of the /metrics, /healthz, /readyz server."),
    Setting("metrics_port", "Port of the metrics server (0: no server).", int),
    Setting("log_level", "DEBUG, INFO, WARNING or ERROR."),
    Setting("log_format", "text or json."),
)


@dataclass(frozen=True)
class WorkerConfig:
    """Resolved settings of one worker; field names are the `SETTINGS` names."""

    bootstrap_servers: str = "127.0.0.1:9092"
    input_topic: str = "documents"
    output_topic: str = "entities"
    dlq_topic: str = "documents.dlq"
    group_id: str = "ner-stream"
    client_id: str = "ner-stream"
    model: str | None = None
    device: str = "auto"
    precision: str = "auto"
    max_f1_change: float = DEFAULT_MAX_F1_CHANGE
    torch_threads: int = 0
    model_process: bool = True
    max_batch_docs: int = 128
    max_batch_tokens: int = 8192
    max_wait_ms: int = 20
    fetch_max_wait_ms: int = 10
    max_doc_bytes: int = 1_048_576
    max_chunk_tokens: int = 128
    line_breaks: str = "auto"
    queue_docs: int = 512
    commit_interval_ms: int = 1000
    session_timeout_ms: int = 45000
    shutdown_timeout_s: float = 30.0
    connect_timeout_s: float = 30.0
    create_topics: bool = False
    topic_partitions: int = 4
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400
    log_level: str = "INFO"
    log_format: str = "text"

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(problems))

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, fit for a log line."""
        secret = {s.name for s in SETTINGS if s.secret}
        return {
            f.name: ("***" if f.name in secret and getattr(self, f.name) else getattr(self, f.name))
            for f in fields(self)
        }

    def model_threads(self) -> int:
        """Threads for the model: one core is left to consuming, tokenizing and Kafka I/O."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, (os.cpu_count() or 2) - 1)

    def kafka_security(self) -> dict[str, Any]:
        """kafka-python keyword arguments for the security settings that are set."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def validate(cfg: WorkerConfig) -> list[str]:
    """Problems with a configuration, each as one sentence naming the flag."""
    problems = []
    positive = (
        "max_batch_docs",
        "max_batch_tokens",
        "max_doc_bytes",
        "max_chunk_tokens",
        "queue_docs",
        "commit_interval_ms",
        "topic_partitions",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if not 6000 <= cfg.session_timeout_ms <= 300000:
        # The broker's group.min/max.session.timeout.ms defaults.
        problems.append("--session-timeout-ms must be between 6000 and 300000")
    if cfg.torch_threads < 0:
        problems.append("--torch-threads must not be negative")
    if cfg.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}")
    if cfg.max_f1_change < 0:
        problems.append("--max-f1-change must not be negative")
    if cfg.max_wait_ms < 0:
        problems.append("--max-wait-ms must not be negative")
    if not 0 <= cfg.fetch_max_wait_ms <= 10_000:
        problems.append("--fetch-max-wait-ms must be between 0 and 10000")
    if cfg.line_breaks not in LINE_BREAK_MODES:
        problems.append(f"--line-breaks must be one of {', '.join(LINE_BREAK_MODES)}")
    if cfg.max_chunk_tokens > cfg.max_batch_tokens:
        problems.append("--max-chunk-tokens must not exceed --max-batch-tokens")
    if cfg.shutdown_timeout_s <= 0 or cfg.connect_timeout_s <= 0:
        problems.append("--shutdown-timeout-s and --connect-timeout-s must be positive")
    if cfg.security_protocol not in PROTOCOLS:
        problems.append(f"--security-protocol must be one of {', '.join(PROTOCOLS)}")
    if cfg.security_protocol.startswith("SASL") and not (cfg.sasl_mechanism and cfg.sasl_username):
        problems.append(f"--security-protocol {cfg.security_protocol} needs --sasl-mechanism "
                        "and --sasl-username")  # fmt: skip
    if cfg.log_level.upper() not in LOG_LEVELS:
        problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    if cfg.log_format not in LOG_FORMATS:
        problems.append(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
    if not 0 <= cfg.metrics_port <= 65535:
        problems.append("--metrics-port must be between 0 and 65535")
    if len({cfg.input_topic, cfg.output_topic, cfg.dlq_topic}) != 3:
        problems.append("--input-topic, --output-topic and --dlq-topic must all differ")
    return problems
