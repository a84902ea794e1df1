"""Worker settings: validation that names the flag, secrets kept out of logs, and the `run` CLI."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import get_type_hints

import click
import pytest
from click.testing import CliRunner

from ner_stream import cli
from ner_stream.cli import main
from ner_stream.config import SETTING_TYPES, SETTINGS, WorkerConfig, setting, settings_of
from ner_stream.tagger import TaggerOptions


@pytest.fixture(autouse=True)
def keep_root_logging():
    """`ner-stream run` configures the root logger; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    kafka_level = logging.getLogger("kafka").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(kafka_level)


# ------------------------------------------------------------------------------- WorkerConfig


def test_settings_and_config_fields_agree():
    """The CLI builds its flags from SETTINGS and passes them to WorkerConfig by name."""
    assert [s.name for s in SETTINGS] == [f.name for f in fields(WorkerConfig)]
    for s in SETTINGS:
        assert s.envvar == "NER_STREAM_" + s.name.upper()


def test_each_setting_is_read_from_its_one_declaration():
    """Default, type, help and secrecy of a setting are those of its WorkerConfig field."""
    hints, defaults = get_type_hints(WorkerConfig), WorkerConfig()
    for s, f in zip(SETTINGS, fields(WorkerConfig), strict=True):
        assert s.default == f.default == getattr(defaults, s.name), s.name
        assert s.help == f.metadata["help"] and s.help.endswith("."), s.name
        assert s.secret is f.metadata["secret"], s.name
        assert s.type in SETTING_TYPES and hints[s.name] in (s.type, s.type | None), s.name
        assert s.flag is (s.type is bool), s.name
        assert s.option == "--" + s.name.replace("_", "-")
    assert [s.name for s in SETTINGS if s.secret] == ["sasl_password"]
    assert [s.name for s in SETTINGS if s.flag] == ["model_process", "create_topics"]


def test_a_field_not_declared_as_a_setting_is_refused():
    @dataclass(frozen=True)
    class Bare:
        x: int = 1

    @dataclass(frozen=True)
    class Listed:
        x: list = setting((), "A list.")

    with pytest.raises(TypeError, match=r"Bare\.x is not declared with setting"):
        settings_of(Bare)
    with pytest.raises(TypeError, match=r"Listed\.x: a setting is a str, int, float or bool"):
        settings_of(Listed)


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name}


def test_the_flags_of_run_are_the_settings_in_order_with_their_help_env_and_default():
    options = [p for p in cli.run.params if isinstance(p, click.Option)]
    assert [p.name for p in options] == [s.name for s in SETTINGS]  # the order of --help
    for p, s in zip(options, SETTINGS, strict=True):
        assert p.opts[0] == s.option and p.is_flag is s.flag, s.name
        assert (p.default, p.envvar, p.help) == (s.default, s.envvar, s.help), s.name
        assert p.show_envvar
        assert bool(p.show_default) is (not s.secret and not s.flag), s.name


def test_the_flags_tag_shares_with_run_come_from_the_same_settings():
    by_name = {s.name: s for s in SETTINGS}
    shared = {name: p for name, p in _options(cli.tag).items() if name in by_name}
    assert set(shared) == {
        "model", "device", "precision", "max_f1_change", "line_breaks", "torch_threads",
        "max_doc_bytes", "model_process",
    }  # fmt: skip
    for name, p in shared.items():
        s = by_name[name]
        assert (p.opts[0], p.default, p.envvar) == (s.option, s.default, s.envvar)
        # `tag`'s 0 threads mean torch's own default without a model process; it has no
        # dead-letter topic (a line over --max-doc-bytes stops it); its model process overlaps
        # reading and writing, not consuming.
        if name not in ("torch_threads", "max_doc_bytes", "model_process"):
            assert p.help == s.help
    for command, topic in ((cli.produce, "input_topic"), (cli.consume, "output_topic")):
        p = _options(command)["topic"]
        assert (p.default, p.envvar) == (by_name[topic].default, by_name[topic].envvar)
        p = _options(command)["bootstrap_servers"]
        assert (p.default, p.envvar) == (WorkerConfig.bootstrap_servers, by_name[p.name].envvar)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"max_batch_docs": 0}, "--max-batch-docs"),
        ({"max_batch_tokens": 0}, "--max-batch-tokens must be at least 1"),
        ({"max_batch_growth": 0}, "--max-batch-growth must be at least 1"),
        ({"max_pass_tokens": 0, "max_chunk_tokens": 0}, "--max-pass-tokens must be at least 1"),
        ({"max_pass_tokens": -5}, "--max-pass-tokens must be at least 1"),
        ({"max_doc_bytes": -1}, "--max-doc-bytes"),
        ({"queue_docs": 0}, "--queue-docs"),
        ({"commit_interval_ms": 0}, "--commit-interval-ms"),
        ({"topic_partitions": 0}, "--topic-partitions"),
        ({"max_wait_ms": -1}, "--max-wait-ms"),
        ({"model_timeout_s": 0.0}, "--model-timeout-s"),
        ({"fetch_max_wait_ms": -1}, "--fetch-max-wait-ms"),
        ({"fetch_max_wait_ms": 60_000}, "--fetch-max-wait-ms"),
        ({"precision": "fp8"}, "--precision"),
        ({"max_f1_change": -0.1}, "--max-f1-change"),
        (
            {"max_chunk_tokens": 512, "max_pass_tokens": 256},
            "--max-chunk-tokens must not exceed --max-pass-tokens",
        ),
        (
            {"max_chunk_tokens": 512, "max_batch_tokens": 256},
            "--max-chunk-tokens must not exceed --max-pass-tokens or --max-batch-tokens",
        ),
        ({"line_breaks": "never"}, "--line-breaks"),
        ({"shutdown_timeout_s": 0}, "--shutdown-timeout-s"),
        ({"connect_timeout_s": -1.0}, "--connect-timeout-s"),
        ({"security_protocol": "TLS"}, "--security-protocol"),
        ({"security_protocol": "SASL_SSL"}, "--sasl-mechanism"),
        ({"log_level": "LOUD"}, "--log-level"),
        ({"log_format": "xml"}, "--log-format"),
        ({"metrics_port": 70000}, "--metrics-port"),
        ({"output_topic": "documents"}, "--output-topic"),
        ({"dlq_topic": "entities"}, "--dlq-topic"),
    ],
)
def test_a_bad_value_is_refused_with_the_flag_named(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        WorkerConfig(**overrides)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        WorkerConfig(max_batch_docs=0, queue_docs=0, log_format="xml")
    message = str(info.value)
    for flag in ("--max-batch-docs", "--queue-docs", "--log-format"):
        assert flag in message
    assert message.count(";") == 2


def test_valid_edge_values_are_accepted():
    WorkerConfig(max_wait_ms=0, metrics_port=0, max_chunk_tokens=64, max_batch_tokens=64,
                 max_pass_tokens=64, log_level="debug")  # fmt: skip


def test_the_two_token_budgets_are_separate_settings():
    """--max-batch-tokens counts real tokens per micro-batch, --max-pass-tokens padded positions
    per forward pass; each must hold a whole window."""
    default = WorkerConfig()
    assert default.max_batch_tokens == default.max_pass_tokens == 8192
    cfg = WorkerConfig(max_batch_tokens=128, max_chunk_tokens=64, max_pass_tokens=256)
    assert (cfg.max_batch_tokens, cfg.max_pass_tokens) == (128, 256)
    with pytest.raises(ValueError, match="--max-chunk-tokens must not exceed --max-pass-tokens"):
        WorkerConfig(max_chunk_tokens=129, max_pass_tokens=128)
    result = CliRunner().invoke(main, ["run"], env={"NER_STREAM_MAX_PASS_TOKENS": "100"})
    assert result.exit_code == 2
    assert "--max-chunk-tokens must not exceed --max-pass-tokens" in result.output


# ------------------------------------------------------------------------------ TaggerOptions


def test_tagger_options_take_their_defaults_and_values_from_the_worker_settings():
    by_name = {s.name: s for s in SETTINGS}
    shared = [f for f in fields(TaggerOptions) if f.name != "buckets"]
    assert [f.name for f in shared] == [
        "device", "max_chunk_tokens", "max_pass_tokens", "precision", "max_f1_change",
        "line_breaks",
    ]  # fmt: skip
    for f in shared:
        assert f.default == by_name[f.name].default, f.name
    cfg = WorkerConfig(device="cpu", max_chunk_tokens=32, max_batch_tokens=100,
                       max_pass_tokens=512, precision="fp32", max_f1_change=0.5,
                       line_breaks="space")  # fmt: skip
    options = TaggerOptions.of(cfg)
    assert options == TaggerOptions(device="cpu", max_chunk_tokens=32, max_pass_tokens=512,
                                    precision="fp32", max_f1_change=0.5,
                                    line_breaks="space")  # fmt: skip
    assert TaggerOptions.of(WorkerConfig()) == TaggerOptions()


def test_redacted_masks_the_sasl_password_and_nothing_else():
    cfg = WorkerConfig(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password="hunter2",
    )
    shown = cfg.redacted()
    assert shown["sasl_password"] == "***"
    assert "hunter2" not in repr(shown)
    assert shown["sasl_username"] == "alice"
    assert shown["bootstrap_servers"] == cfg.bootstrap_servers
    assert set(shown) == {f.name for f in fields(WorkerConfig)}
    # Nothing to hide when no password is set: None stays None (and says so).
    assert WorkerConfig().redacted()["sasl_password"] is None


def test_the_configs_repr_leaves_the_password_out():
    # A traceback, a debugger or an f"{cfg}" shows the repr; the password must not be in it.
    cfg = WorkerConfig(security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                       sasl_username="alice", sasl_password="hunter2")  # fmt: skip
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg)
    assert "sasl_username='alice'" in repr(cfg)


def test_no_setting_turns_the_tls_host_name_check_off():
    # kafka-python checks the broker's certificate against the host connected to unless told
    # not to (ssl_check_hostname=False); no setting of the worker may tell it so unnoticed.
    assert [s.name for s in SETTINGS if "hostname" in s.name or "verify" in s.name] == []
    cfg = WorkerConfig(security_protocol="SSL", ssl_cafile="ca.pem")
    assert "ssl_check_hostname" not in cfg.kafka_security()


def test_kafka_security_passes_only_what_is_set():
    assert WorkerConfig().kafka_security() == {"security_protocol": "PLAINTEXT"}
    cfg = WorkerConfig(
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="alice",
        sasl_password="hunter2",
        ssl_cafile="ca.pem",
    )
    assert cfg.kafka_security() == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "hunter2",
        "ssl_cafile": "ca.pem",
    }
    mtls = WorkerConfig(security_protocol="SSL", ssl_certfile="c.pem", ssl_keyfile="k.pem")
    assert mtls.kafka_security() == {
        "security_protocol": "SSL",
        "ssl_certfile": "c.pem",
        "ssl_keyfile": "k.pem",
    }


# ------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def captured(monkeypatch) -> list[WorkerConfig]:
    """Replace the worker behind `ner-stream run` by one that records its configuration."""
    seen: list[WorkerConfig] = []

    def fake_run_worker(cfg: WorkerConfig) -> int:
        seen.append(cfg)
        return 0

    monkeypatch.setattr(cli, "_run_worker", fake_run_worker)
    return seen


def test_run_reads_each_flag_from_its_environment_variable(captured):
    env = {
        "NER_STREAM_INPUT_TOPIC": "docs-in",
        "NER_STREAM_MAX_BATCH_DOCS": "7",
        "NER_STREAM_SHUTDOWN_TIMEOUT_S": "2.5",
        "NER_STREAM_CREATE_TOPICS": "true",
        "NER_STREAM_METRICS_PORT": "0",
    }
    result = CliRunner().invoke(main, ["run"], env=env)
    assert result.exit_code == 0, result.output
    [cfg] = captured
    assert cfg.input_topic == "docs-in"
    assert cfg.max_batch_docs == 7
    assert cfg.shutdown_timeout_s == 2.5
    assert cfg.create_topics is True
    assert cfg.metrics_port == 0


def test_a_flag_wins_over_its_environment_variable(captured):
    result = CliRunner().invoke(
        main, ["run", "--max-batch-docs", "3"], env={"NER_STREAM_MAX_BATCH_DOCS": "9"}
    )
    assert result.exit_code == 0, result.output
    assert captured[0].max_batch_docs == 3


def test_a_bad_environment_value_exits_2_naming_the_flag(captured):
    result = CliRunner().invoke(main, ["run"], env={"NER_STREAM_MAX_BATCH_DOCS": "0"})
    assert result.exit_code == 2
    assert "--max-batch-docs must be at least 1" in result.output
    assert "Traceback" not in result.output
    assert captured == []  # nothing started


def test_a_value_of_the_wrong_type_exits_2(captured):
    result = CliRunner().invoke(main, ["run"], env={"NER_STREAM_QUEUE_DOCS": "many"})
    assert result.exit_code == 2
    assert "queue-docs" in result.output
    assert captured == []


def test_a_missing_model_file_exits_2_with_one_sentence():
    result = CliRunner().invoke(
        main,
        ["run", "--model", "/nonexistent.nerm", "--metrics-port", "0",
         "--sasl-password", "hunter2"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("ner-stream:")]
    assert lines == ["ner-stream: model file not found: /nonexistent.nerm"]
    assert "Traceback" not in result.output
    assert "hunter2" not in result.output  # the start-up log line shows the settings redacted


def test_run_help_lists_the_environment_variables():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    for s in SETTINGS:
        assert s.option in result.output
        assert s.envvar in result.output


def test_run_help_never_shows_the_password_even_when_it_is_set():
    env = {"NER_STREAM_SASL_PASSWORD": "hunter2", "NER_STREAM_SASL_USERNAME": "alice"}
    result = CliRunner().invoke(main, ["run", "--help"], env=env)
    assert result.exit_code == 0
    assert "NER_STREAM_SASL_PASSWORD" in result.output
    assert "hunter2" not in result.output


def _readme_flag_rows() -> list[tuple[list[str], list[str]]]:
    """(flags, defaults) of each row of README's flag table of `run`."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme.split("| flag | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        flags_cell, default_cell = line.split(" | ")[:2]
        flags = [
            f for f in re.findall(r"`(--[a-z0-9-]+)`", flags_cell) if not f.startswith("--no-")
        ]
        defaults = [d.strip().strip("`") for d in re.split(r" / |, ", default_cell)]
        rows.append((flags, defaults))
    return rows


def _shown(value) -> str | None:
    """A default as README writes it (None: described in words)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_readme_flag_table_lists_every_setting_with_its_default():
    rows = _readme_flag_rows()
    listed = [flag for flags, _ in rows for flag in flags]
    assert sorted(listed) == sorted(s.option for s in SETTINGS)
    by_option = {s.option: s for s in SETTINGS}
    for flags, defaults in rows:
        if len(flags) != len(defaults):  # one default for a group of flags (security)
            continue
        for flag, shown in zip(flags, defaults, strict=True):
            expected = _shown(by_option[flag].default)
            if expected is not None:
                assert shown == expected, flag
