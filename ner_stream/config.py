"""Every setting of `ner-stream run`, declared once: a field of `WorkerConfig` holds its default,
its type (the annotation) and, in its metadata, its help and whether it is secret.

`SETTINGS` is read back from those fields, in their order. The CLI builds its flags from it; each
flag is also read from `NER_STREAM_<NAME>` (for example `NER_STREAM_BOOTSTRAP_SERVERS`).
`WorkerConfig` holds the resolved values.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from ner_stream.precision import DEFAULT_MAX_F1_CHANGE, PRECISIONS
from ner_stream.text import LINE_BREAK_MODES

ENV_PREFIX = "NER_STREAM_"
SETTING_TYPES = (str, int, float, bool)  # bool: a switch, --x / --no-x


def setting(default: Any, help: str, *, secret: bool = False) -> Any:
    """A `WorkerConfig` field: its `default`, its `help` (one sentence, shown by `--help`) and
    whether it is `secret` (masked in logs, its default not shown, left out of the config's
    repr). Returns a `dataclasses.field`.
    """
    # repr=False: a traceback or a debug print of the config must not carry the secret either.
    return field(default=default, metadata={"help": help, "secret": secret}, repr=not secret)


@dataclass(frozen=True)
class Setting:
    """One configuration key, as declared by its `WorkerConfig` field."""

    name: str
    help: str
    type: Any = str  # one of SETTING_TYPES: the field's annotation without `| None`
    secret: bool = False  # never printed in logs
    default: Any = None

    @property
    def flag(self) -> bool:
        """Whether it is a boolean switch (--x / --no-x)."""
        return self.type is bool

    @property
    def envvar(self) -> str:
        """The environment variable it is read from: NER_STREAM_<NAME>."""
        return ENV_PREFIX + self.name.upper()

    @property
    def option(self) -> str:
        """Its command-line flag: --name-with-dashes."""
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class WorkerConfig:
    """Resolved settings of one worker; each field is one setting (see `setting`, `SETTINGS`).

    Raises ValueError naming every bad flag (see `validate`) when built with bad values.
    """

    bootstrap_servers: str = setting("127.0.0.1:9092", "Kafka bootstrap servers, comma separated.")
    input_topic: str = setting("documents", "Topic the documents are read from.")
    output_topic: str = setting("entities", "Topic the entities are written to.")
    dlq_topic: str = setting("documents.dlq", "Dead-letter topic for input that cannot be tagged.")
    group_id: str = setting("ner-stream", "Consumer group; workers in one group share partitions.")
    client_id: str = setting("ner-stream", "Kafka client id prefix.")
    model: str | None = setting(None, "Model file (default: the packaged English model).")
    model_watch_s: float = setting(
        5.0,
        "How often the --model file is checked for a new model to swap in without a restart "
        "(0: only on SIGHUP).",
    )
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda.")
    precision: str = setting(
        "auto",
        "Network precision: auto (bf16 on a CPU with native bf16 when the "
        "model's dev F1 allows), fp32, bf16 or fp16 (CUDA).",
    )
    max_f1_change: float = setting(
        DEFAULT_MAX_F1_CHANGE,
        "Dev-F1 points a reduced precision may move (from the model "
        "file's measurement) to be used.",
    )
    torch_threads: int = setting(0, "CPU threads for the model (0: every core but one).")
    model_process: bool = setting(True, "On the CPU, run the model in a child process of its own.")
    model_timeout_s: float = setting(
        60.0,
        "Longest the model process may take to answer a pass before it counts as hung: it is "
        "then stopped and restarted like one that died.",
    )
    max_batch_docs: int = setting(128, "Most documents in one micro-batch.")
    max_batch_tokens: int = setting(8192, "Most real tokens in one micro-batch.")
    max_batch_growth: int = setting(
        2,
        "While the model already holds two micro-batches, the next may grow to this many times "
        "--max-batch-docs and --max-batch-tokens (1: never).",
    )
    max_pass_tokens: int = setting(
        8192, "Most padded positions (rows x length) in one forward pass."
    )
    max_wait_ms: int = setting(20, "Longest wait for a batch to fill, from its first document.")
    fetch_max_wait_ms: int = setting(
        10,
        "Longest the broker holds a fetch while input trickles in; shorter lowers "
        "latency at light load, but an idle worker then polls more often.",
    )
    max_doc_bytes: int = setting(1_048_576, "Larger input values go to the dead-letter topic.")
    max_chunk_tokens: int = setting(128, "Sentences longer than this are cut into windows.")
    line_breaks: str = setting(
        "auto",
        "Does a single line break end a sentence: auto (yes, unless it wraps prose), "
        "sentence (always) or space (never).",
    )
    queue_docs: int = setting(512, "Documents buffered between consuming and tagging.")
    queue_tokens: int = setting(
        262_144,
        "Tokens of the documents buffered between consuming and tagging (a tokenized document "
        "holds about 250 bytes per token); a larger document is still taken, alone.",
    )
    commit_interval_ms: int = setting(
        1000,
        "How often acknowledged offsets are committed (exactly-once: how often a transaction "
        "is committed).",
    )
    processing_guarantee: str = setting(
        "at-least-once",
        "at-least-once (a crash or rebalance may repeat outputs) or exactly-once (Kafka "
        "transactions: a read_committed reader sees one output per input).",
    )
    instance_id: str | None = setting(
        None,
        "A name for this worker, unique in its group and the same across its restarts (a "
        "StatefulSet pod name); exactly-once needs it for the transactional id.",
    )
    transaction_timeout_ms: int = setting(
        60000,
        "Exactly-once: how long the broker lets a transaction stay open before aborting it; "
        "a crashed worker's outputs block read_committed readers at most this long.",
    )
    session_timeout_ms: int = setting(45000, "How long the group waits for a silent worker.")
    shutdown_timeout_s: float = setting(30.0, "Bound on a graceful shutdown.")
    connect_timeout_s: float = setting(30.0, "How long to retry an unreachable broker at start.")
    create_topics: bool = setting(False, "Create the input, output and dead-letter topics.")
    topic_partitions: int = setting(4, "Partitions of topics made by --create-topics.")
    security_protocol: str = setting("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl_mechanism: str | None = setting(None, "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.")
    sasl_username: str | None = setting(None, "SASL user name.")
    sasl_password: str | None = setting(None, "SASL password.", secret=True)
    ssl_cafile: str | None = setting(None, "CA certificate file (PEM).")
    ssl_certfile: str | None = setting(None, "Client certificate file (PEM).")
    ssl_keyfile: str | None = setting(None, "Client private key file (PEM).")
    metrics_host: str = setting("127.0.0.1", "Address of the /metrics, /healthz, /readyz server.")
    metrics_port: int = setting(9400, "Port of the metrics server (0: no server).")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR.")
    log_format: str = setting("text", "text or json.")

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

    @property
    def exactly_once(self) -> bool:
        """Whether outputs, dead letters and offsets are committed in Kafka transactions."""
        return self.processing_guarantee == "exactly-once"

    def transactional_id(self) -> str | None:
        """The producer's transactional id, ``<group id>-<instance id>`` (exactly-once only).

        The same id across a worker's restarts lets the broker abort the transaction a crashed
        worker left open as soon as it starts again, instead of after the transaction timeout.
        """
        return f"{self.group_id}-{self.instance_id}" if self.exactly_once else None

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


GUARANTEES = ("at-least-once", "exactly-once")
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def _setting_type(annotation: Any, name: str) -> type:
    """The type of a setting from its field's annotation (`X` or `X | None`)."""
    if isinstance(annotation, types.UnionType):
        args = [a for a in annotation.__args__ if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    if annotation not in SETTING_TYPES:
        raise TypeError(f"{name}: a setting is a str, int, float or bool, not {annotation}")
    return annotation


def settings_of(cls: type) -> tuple[Setting, ...]:
    """One `Setting` per field of the dataclass `cls` (`WorkerConfig`), in field order.

    Raises TypeError for a field not declared with `setting` or not of a `SETTING_TYPES` type.
    """
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        where = f"{cls.__name__}.{f.name}"
        if "help" not in f.metadata:
            raise TypeError(f"{where} is not declared with setting(default, help)")
        out.append(Setting(f.name, f.metadata["help"], _setting_type(hints[f.name], where),
                           f.metadata["secret"], f.default))  # fmt: skip
    return tuple(out)


SETTINGS: tuple[Setting, ...] = settings_of(WorkerConfig)


def validate(cfg: WorkerConfig) -> list[str]:
    """Problems with a configuration, each as one sentence naming the flag; empty when valid."""
    problems = []
    positive = (
        "max_batch_docs",
        "max_batch_tokens",
        "max_batch_growth",
        "max_pass_tokens",
        "max_doc_bytes",
        "max_chunk_tokens",
        "queue_docs",
        "queue_tokens",
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
    if cfg.model_timeout_s <= 0:
        problems.append("--model-timeout-s must be positive")
    if cfg.model_watch_s < 0:
        problems.append("--model-watch-s must not be negative")
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
    # One window must fit one forward pass, and one micro-batch.
    if cfg.max_chunk_tokens > min(cfg.max_pass_tokens, cfg.max_batch_tokens):
        problems.append(
            "--max-chunk-tokens must not exceed --max-pass-tokens or --max-batch-tokens"
        )
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
    if cfg.processing_guarantee not in GUARANTEES:
        problems.append(f"--processing-guarantee must be one of {', '.join(GUARANTEES)}")
    elif cfg.exactly_once and not cfg.instance_id:
        problems.append(
            "--processing-guarantee exactly-once needs --instance-id (a name unique in the group "
            "and stable across restarts, such as the pod name)"
        )
    if cfg.exactly_once and not cfg.commit_interval_ms < cfg.transaction_timeout_ms <= 900_000:
        # 900000: the broker's transaction.max.timeout.ms default.
        problems.append(
            "--transaction-timeout-ms must exceed --commit-interval-ms and be at most 900000"
        )
    if len({cfg.input_topic, cfg.output_topic, cfg.dlq_topic}) != 3:
        problems.append("--input-topic, --output-topic and --dlq-topic must all differ")
    return problems
