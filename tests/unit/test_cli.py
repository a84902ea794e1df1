"""`ner-stream tag` and `produce` on files and stdin: what a line is, what comes out."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from ner_stream import kafka_io
from ner_stream.checkpoint import save
from ner_stream.cli import _lines, main, tag_documents
from tests.fakes import FakeProducer, make_tagger, rigged_model
from training.cli import main as ner_train


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """The rigged model ("Peter" -> PER, "Paris" -> LOC) as a model file."""
    path = tmp_path_factory.mktemp("model") / "rigged.nerm"
    loaded = rigged_model()
    save(path, loaded.model, loaded.info)
    return str(path)


def tag(model_path: str, *args: str, input: bytes | None = None) -> list[dict]:
    """Run `ner-stream tag` and return its output objects; fails the test on a non-zero exit."""
    result = CliRunner().invoke(
        main, ["tag", "--model", model_path, "--device", "cpu", *args], input=input
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def spans(out: dict) -> list[tuple[str, str, int, int]]:
    return [(e["text"], e["type"], e["start"], e["end"]) for e in out["entities"]]


# A lone "\r" inside a line, then a line ended by "\r\n", then one by "\n", then one by nothing.
LINES = b"Peter went\rto Paris\r\nParis\nto Peter\n\rPeter"


@pytest.mark.parametrize("fmt", ["text", "auto"])
def test_only_newlines_end_a_text_line_in_a_file_and_on_stdin(model_path, tmp_path, fmt):
    path = tmp_path / "in.txt"
    path.write_bytes(LINES)
    for outs in (
        tag(model_path, "--format", fmt, str(path)),
        tag(model_path, "--format", fmt, input=LINES),
    ):
        assert [o["id"] for o in outs] == ["1", "2", "3", "4"]
        assert [spans(o) for o in outs] == [
            [("Peter", "PER", 0, 5), ("Paris", "LOC", 14, 19)],
            [("Paris", "LOC", 0, 5)],
            [("Peter", "PER", 3, 8)],
            [("Peter", "PER", 1, 6)],  # the lone "\r" stays at the start of the document
        ]


def test_a_jsonl_file_may_end_its_lines_with_crlf_and_start_with_a_bom(model_path, tmp_path):
    path = tmp_path / "in.jsonl"
    # A lone "\r" between JSON tokens is whitespace, not the end of a line.
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "Peter\\r"}\r\n{"text":\r"\\rParis"}\r\n')
    outs = tag(model_path, "--format", "jsonl", str(path))
    assert [(o["id"], spans(o)) for o in outs] == [
        ("a", [("Peter", "PER", 0, 5)]),
        ("2", [("Paris", "LOC", 1, 6)]),
    ]


def test_produce_keeps_a_lone_carriage_return_in_the_document(monkeypatch, tmp_path):
    producers: list[FakeProducer] = []  # one per run: produce closes its producer

    def make_producer(cfg):
        producers.append(FakeProducer())
        return producers[-1]

    monkeypatch.setattr(kafka_io, "make_producer", make_producer)
    monkeypatch.setattr(kafka_io, "connect_admin", lambda cfg: FakeAdmin())
    path = tmp_path / "in.txt"
    path.write_bytes(b"Peter went\rto Paris\r\nParis\n")
    for args, stdin in (([str(path)], None), ([], path.read_bytes())):
        result = CliRunner().invoke(main, ["produce", "--format", "text", *args], input=stdin)
        assert result.exit_code == 0, result.output
        producer = producers[-1]
        assert [s.json() for s in producer.sent] == [
            {"id": "1", "text": "Peter went\rto Paris"},
            {"id": "2", "text": "Paris"},
        ]
        assert [s.key for s in producer.sent] == [b"1", b"2"]


def test_a_line_that_is_not_utf8_is_named_without_a_traceback(model_path, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"Peter\nPar\xffis\n")
    result = CliRunner().invoke(main, ["tag", "--model", model_path, str(path)])
    assert result.exit_code == 1
    assert f"{path}:2: not valid UTF-8" in result.output
    assert "Traceback" not in result.output


def test_pass_through_fields_are_nested_under_meta_and_never_shadow_the_output(model_path):
    lines = [
        {"id": "g1", "text": "Peter went to Paris.", "entities": [{"text": "x"}], "lang": "en"},
        {"text": "Paris", "id": ""},
        {"id": 7, "text": "", "meta": {"a": 1}},
        {"id": None, "text": "to Peter"},
    ]
    stdin = "\n".join(json.dumps(line) for line in lines).encode()
    for fmt in ("jsonl", "auto"):
        outs = tag(model_path, "--format", fmt, input=stdin)
        assert [sorted(o) for o in outs] == [
            ["entities", "id", "meta"], ["entities", "id"], ["entities", "id", "meta"],
            ["entities", "id"],
        ]  # fmt: skip
        assert [o["id"] for o in outs] == ["g1", "2", "7", "4"]
        assert spans(outs[0]) == [("Peter", "PER", 0, 5), ("Paris", "LOC", 14, 19)]
        assert outs[0]["meta"] == {"entities": [{"text": "x"}], "lang": "en"}
        assert outs[2]["meta"] == {"meta": {"a": 1}}
        assert spans(outs[3]) == [("Peter", "PER", 3, 8)]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"text": "Peter", "score": NaN}', "not valid JSON (invalid JSON constant NaN)"),
        ('{"text": "Peter", "score": -Infinity}', "not valid JSON (invalid JSON constant"),
        ('{"text": "Pa\\ud800ris"}', "not valid JSON (string with an unpaired surrogate"),
        ('{"text": "Peter", "tags": ["\\udfff"]}', "not valid JSON (string with an unpaired"),
        ('{"text": "Peter"', "not valid JSON (Expecting"),
        ('{"id": true, "text": "Peter"}', "id is a JSON boolean"),
        ('{"id": "a", "text": 5}', "expected an object with a text"),
    ],
)
def test_a_json_line_that_run_would_refuse_stops_tag_with_the_line_named(
    model_path, tmp_path, line, why
):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "Peter \\ud83d\\ude00"}\n' + line + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["tag", "--model", model_path, "--device", "cpu", str(path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a traceback
    assert f"{path}:2: {why}" in result.stderr


def test_an_output_stays_one_line_whatever_line_separators_its_strings_hold(model_path):
    line = json.dumps({"id": "a\u2028b", "text": "Peter\u2028went to\x85Paris", "note": "x\u2029y"})
    [out] = tag(model_path, input=line.encode() + b"\n")  # tag() splits with str.splitlines
    assert out["id"] == "a\u2028b" and out["meta"] == {"note": "x\u2029y"}
    assert [(e["text"], e["type"]) for e in out["entities"]] == [("Peter", "PER"), ("Paris", "LOC")]


@pytest.mark.parametrize(("args", "env", "mode"), [
    ((), {}, "auto"),
    (("--line-breaks", "space"), {}, "space"),
    ((), {"NER_STREAM_LINE_BREAKS": "sentence"}, "sentence"),
])  # fmt: skip
def test_tag_passes_its_line_break_mode_to_the_tagger(model_path, monkeypatch, args, env, mode):
    from ner_stream.tagger import Tagger

    seen = []
    real = Tagger.from_file.__func__

    def spy(cls, path=None, options=None):
        seen.append(options.line_breaks)
        return real(cls, path, options)

    monkeypatch.setattr(Tagger, "from_file", classmethod(spy))
    result = CliRunner().invoke(
        main, ["tag", "--model", model_path, *args], input=b"Peter\n", env=env
    )
    assert result.exit_code == 0, result.output
    assert seen == [mode]
    bad = CliRunner().invoke(main, ["tag", "--model", model_path, "--line-breaks", "never"])
    assert bad.exit_code == 2 and "'never' is not one of" in bad.output


def test_tag_documents_yields_outputs_in_order_one_submission_per_batch():
    tagger = make_tagger("rigged")
    calls: list[int] = []
    real = tagger.submit

    def counting(windows):
        windows = list(windows)
        calls.append(len({id(doc) for doc, _ in windows}))
        return real(windows)

    tagger.submit = counting
    read: list[str] = []

    def documents():
        for i, text in enumerate(["Peter", "went", "to Paris", "Paris", "x"], 1):
            read.append(str(i))
            yield str(i), text, ({"n": i} if i == 3 else {})

    counted: list[tuple[int, int]] = []
    outs = tag_documents(tagger, documents(), batch_docs=2, in_flight=1,
                         on_batch=lambda *n: counted.append(n))  # fmt: skip
    first = next(outs)
    assert read == ["1", "2"] and calls == [2]  # lazy: one batch read and tagged
    rest = list(outs)
    assert calls == [2, 2, 1]
    assert counted == [(2, 2), (2, 3), (1, 1)]  # documents and tokens of each batch
    assert [o["id"] for o in [first, *rest]] == ["1", "2", "3", "4", "5"]
    assert sorted(first) == ["entities", "id"]  # no pass-through fields: no "meta"
    assert [(e["text"], e["type"], e["start"], e["end"]) for e in first["entities"]] == [
        ("Peter", "PER", 0, 5)
    ]
    assert rest[1]["meta"] == {"n": 3}
    with pytest.raises(ValueError, match="batch_docs"):
        next(tag_documents(tagger, documents(), batch_docs=0))
    with pytest.raises(ValueError, match="in_flight"):
        next(tag_documents(tagger, documents(), in_flight=0))

    # With submissions in flight, reading runs ahead of the outputs by at most that many
    # batches, and the outputs are the same, in the same order.
    read.clear()
    ahead = tag_documents(tagger, documents(), batch_docs=1, in_flight=3)
    assert next(ahead) == first and read == ["1", "2", "3"]
    assert list(ahead) == rest and read == ["1", "2", "3", "4", "5"]


def test_tag_documents_hands_out_what_was_read_before_a_bad_line(model_path):
    tagger = make_tagger("rigged")

    def documents():
        yield "1", "Peter", {}
        yield "2", "Paris", {}
        raise click.ClickException("in.txt:3: bad line")

    outs = tag_documents(tagger, documents(), batch_docs=1, in_flight=3)
    assert [next(outs)["id"], next(outs)["id"]] == ["1", "2"]
    with pytest.raises(click.ClickException, match="bad line"):
        next(outs)


def test_tag_documents_cuts_batches_and_submissions_by_tokens_and_tags_long_documents_whole():
    """Memory follows the token budget, not the documents' sizes: a batch closes at
    `batch_tokens`, a longer document goes alone and its windows reach the model at most
    `batch_tokens` at a time; its entities are those of tagging it in one piece."""
    tagger = make_tagger("rigged", max_chunk_tokens=8)
    long_text = " ".join(["Peter went to Paris ."] * 30)  # 150 tokens, 30 windows
    texts = ["Peter .", long_text, "Paris .", "Peter went to Paris ."]
    submitted: list[int] = []
    submit = tagger.submit

    def counting_submit(windows):
        windows = list(windows)
        submitted.append(sum(len(d.windows[w]) for d, w in windows))
        return submit(windows)

    tagger.submit = counting_submit
    docs = [(str(i), t, {}) for i, t in enumerate(texts)]
    counted: list[tuple[int, int]] = []
    outs = list(tag_documents(tagger, docs, batch_docs=64, batch_tokens=20,
                              on_batch=lambda *n: counted.append(n)))  # fmt: skip
    assert counted == [(1, 2), (1, 150), (2, 7)]  # docs and tokens of each batch
    assert max(submitted) <= 20 and sum(submitted) == 159
    whole = tagger.tag_prepared([tagger.prepare(long_text)])[0][0]
    assert [e["start"] for e in outs[1]["entities"]] == [e.start for e in whole]
    assert len(whole) == 60
    with pytest.raises(ValueError, match="batch_tokens"):
        next(tag_documents(tagger, docs, batch_tokens=0))


def test_tag_refuses_a_line_longer_than_max_doc_bytes_and_names_it(model_path, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"Peter\r\n" + b"x" * 20 + b"\nParis\n" + b"y" * 5_000_000)
    args = ["tag", "--model", model_path, "--batch-docs", "1", "--max-doc-bytes", "20", str(path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "in.txt:4: longer than --max-doc-bytes (20 bytes)" in result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["1", "2", "3"]
    # A line of exactly the limit is read, whatever its line end.
    ok = CliRunner().invoke(main, ["tag", "--model", model_path, "--max-doc-bytes", "7"],
                            input=b"Peter .\r\nParis .")  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert len(ok.stdout.splitlines()) == 2


def test_a_line_too_long_is_refused_without_being_read_whole():
    class Watched(io.BytesIO):
        largest = 0

        def readline(self, size=-1):
            line = super().readline(size)
            self.largest = max(self.largest, len(line))
            return line

    stream = Watched(b"ok\n" + b"y" * 5_000_000)
    with pytest.raises(click.ClickException, match=":2: longer than --max-doc-bytes"):
        list(_lines(stream, 100))
    assert stream.largest <= 103


def test_ner_train_predict_is_ner_stream_tag_on_text_lines(model_path, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(LINES)
    expected = tag(model_path, "--format", "text", str(path))
    for args, stdin in (([str(path)], None), ([], LINES)):
        result = CliRunner().invoke(
            ner_train, ["predict", "--model", model_path, "--device", "cpu", *args], input=stdin
        )
        assert result.exit_code == 0, result.output
        assert [json.loads(line) for line in result.stdout.splitlines()] == expected


def test_python_dash_m_ner_stream_cli_runs_the_command_line():
    """`python -m ner_stream.cli` runs the command line."""
    done = subprocess.run([sys.executable, "-m", "ner_stream.cli", "--help"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0
    assert "Usage" in done.stdout, (done.stdout, done.stderr)


def test_tag_output_writes_the_lines_stdout_would_get_and_nothing_to_stdout(model_path, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(LINES)
    expected = tag(model_path, "--format", "text", str(path))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        main, ["tag", "--model", model_path, "--format", "text", "-o", str(out), str(path)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.jsonl"]


@pytest.mark.parametrize("batch_docs", ["1", "64"])
def test_tag_output_after_a_bad_line_leaves_only_a_partial_file_and_names_it(
    model_path, tmp_path, batch_docs
):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "Peter"}\n{"text": "Paris"}\n{"text": 3}\n')
    out = tmp_path / "out.jsonl"
    args = ["tag", "--model", model_path, "--batch-docs", batch_docs, "-o", str(out), str(path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "in.jsonl:3: expected an object with a text" in result.output
    assert "out.jsonl.partial" in result.output
    assert not out.exists()
    partial = (tmp_path / "out.jsonl.partial").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in partial] == ["1", "2"]


def test_tag_progress_on_a_file_ends_with_every_document_and_all_bytes_read(model_path, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"Peter went to Paris\n" * 300)
    args = ["tag", "--model", model_path, "--progress", "-o", str(tmp_path / "o"), str(path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("300 documents  ") and "tokens/s" in last and last.endswith("100%")
    quiet = CliRunner().invoke(main, args[:3] + args[4:])  # not a terminal: no progress
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_tag_torch_threads_sets_the_model_threads_and_refuses_a_negative(model_path, monkeypatch):
    import torch

    seen: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    args = ["--no-model-process"]
    assert tag(model_path, *args, "--torch-threads", "1", input=b"Peter\n")[0]["entities"]
    assert seen == [1]
    assert tag(model_path, *args, input=b"Peter\n") and seen == [1]  # 0: torch's default
    bad = CliRunner().invoke(main, ["tag", "--model", model_path, "--torch-threads", "-1"])
    assert bad.exit_code == 2 and "must not be negative" in bad.output


def test_tag_runs_the_model_in_a_model_process_with_the_same_outputs(model_path, monkeypatch):
    from ner_stream import cli

    started: list[int] = []
    real = cli.ModelProcess

    def recording(path, precision, threads, **kwargs):
        started.append(threads)
        return real(path, precision, threads, **kwargs)

    monkeypatch.setattr(cli, "ModelProcess", recording)
    lines = b"Peter went to Paris\n" * 150 + b"Paris\n"
    here = tag(model_path, "--no-model-process", "--batch-docs", "2", input=lines)
    assert started == []
    there = tag(model_path, "--batch-docs", "2", "--torch-threads", "2", input=lines)
    assert started == [2]  # --torch-threads: the model process's threads
    assert there == here and len(there) == 151
    assert [e["text"] for e in there[0]["entities"]] == ["Peter", "Paris"]


def test_tag_fails_with_one_sentence_when_the_model_process_does_not_start(model_path, monkeypatch):
    from ner_stream import cli

    def failing(*args, **kwargs):
        raise cli.ModelProcessError("the model process exited during start-up")

    monkeypatch.setattr(cli, "ModelProcess", failing)
    result = CliRunner().invoke(main, ["tag", "--model", model_path], input=b"Peter\n")
    assert result.exit_code == 1
    assert "the model process exited during start-up" in result.output


class FakeAdmin:
    def close(self) -> None:
        pass


SECURE = ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-512",
          "--sasl-username", "ner-stream", "--ssl-cafile", "ca.pem"]  # fmt: skip


def test_produce_and_consume_reach_a_secure_broker_with_the_flags_run_takes(monkeypatch):
    import kafka

    seen: dict[str, object] = {}

    def connect_admin(cfg):
        seen["admin"] = cfg.kafka_security()
        return FakeAdmin()

    def make_producer(cfg):
        seen["producer"] = cfg.kafka_security()
        return FakeProducer()

    class Consumer:
        def __init__(self, topic, **kwargs):
            seen["consumer"] = kwargs

        def __iter__(self):
            return iter(())

        def close(self):
            pass

    monkeypatch.setattr(kafka_io, "connect_admin", connect_admin)
    monkeypatch.setattr(kafka_io, "make_producer", make_producer)
    monkeypatch.setattr(kafka, "KafkaConsumer", Consumer)
    env = {"NER_STREAM_SASL_PASSWORD": "s3cret"}
    want = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "ner-stream", "sasl_plain_password": "s3cret",
            "ssl_cafile": "ca.pem"}  # fmt: skip
    produced = CliRunner().invoke(main, ["produce", *SECURE], input=b"Peter\n", env=env)
    assert produced.exit_code == 0, produced.output
    assert seen["admin"] == seen["producer"] == want
    consumed = CliRunner().invoke(main, ["consume", *SECURE], env=env)
    assert consumed.exit_code == 0, consumed.output
    assert {k: seen["consumer"][k] for k in want} == want
    assert "s3cret" not in CliRunner().invoke(main, ["consume", "--help"], env=env).output


def test_produce_and_consume_exit_2_on_bad_settings_and_3_when_kafka_refuses(monkeypatch):
    for command in ("produce", "consume"):
        bad = CliRunner().invoke(main, [command, "--security-protocol", "SASL_SSL"], input=b"")
        assert bad.exit_code == 2 and "needs --sasl-mechanism and --sasl-username" in bad.output

    def refuse(cfg):
        raise kafka_io.StartupError("Kafka refused the credentials of ner-stream", exit_code=3)

    monkeypatch.setattr(kafka_io, "connect_admin", refuse)
    for command in ("produce", "consume"):
        result = CliRunner().invoke(main, [command, *SECURE], input=b"Peter\n")
        assert result.exit_code == 3
        assert result.output.strip().endswith("Kafka refused the credentials of ner-stream")
