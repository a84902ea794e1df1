"""`ner-stream`: run the streaming worker, or tag, produce and consume from the command line.

Exit codes of `run`: 0 clean shutdown; 1 stopped on a runtime error (a missing ACL included);
2 bad configuration (flag, model file, missing topic); 3 Kafka unreachable, or refusing the
credentials or the certificate check (`kafka_io.connect_admin`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

from ner_stream import __version__, heap
from ner_stream.checkpoint import CheckpointError, default_model_path
from ner_stream.config import SETTINGS, WorkerConfig
from ner_stream.logs import configure_logging
from ner_stream.messages import document_id, output_object, parse_json, pass_through
from ner_stream.model_process import LocalUntilStarted, ModelProcess, ModelProcessError
from ner_stream.model_swap import ModelSwapper
from ner_stream.precision import PRECISIONS
from ner_stream.progress import TagProgress
from ner_stream.tagger import Tagger, TaggerOptions
from ner_stream.text import LINE_BREAK_MODES

if TYPE_CHECKING:
    from ner_stream.metrics import Metrics

log = logging.getLogger("ner_stream")

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
BOOTSTRAP = SETTINGS_BY_NAME["bootstrap_servers"]


def setting_option(name: str, **overrides: Any) -> Callable:
    """The click option of the worker setting `name` (a `SETTINGS` name): its flag, default,
    help and NER_STREAM_* variable, all from its `WorkerConfig` field.

    `overrides` replace `click.option` keyword arguments (for example a stricter `type` for a
    command that checks the value itself). Raises KeyError for an unknown name.
    """
    s = SETTINGS_BY_NAME[name]
    if s.flag:
        decl = [f"{s.option}/--no-{s.option[2:]}", s.name]
        kwargs: dict[str, Any] = {"default": s.default}
    else:
        decl = [s.option, s.name]
        kwargs = {"type": s.type, "default": s.default, "show_default": not s.secret}
    kwargs.update(envvar=s.envvar, show_envvar=True, help=s.help)
    return click.option(*decl, **{**kwargs, **overrides})


def settings_options(func):
    """Attach one click option per worker setting, each also read from its NER_STREAM_* variable."""
    for s in reversed(SETTINGS):
        func = setting_option(s.name)(func)
    return func


# The settings that reach a secure broker, shared by `run`, `produce` and `consume` (flags,
# NER_STREAM_* variables, help).
SECURITY_SETTINGS = (
    "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile",
    "ssl_certfile", "ssl_keyfile", "connect_timeout_s",
)  # fmt: skip


def security_options(func):
    """Attach the options of `SECURITY_SETTINGS` (see `setting_option`)."""
    for name in reversed(SECURITY_SETTINGS):
        func = setting_option(name)(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ner-stream")
def main() -> None:
    """Streaming named-entity recognition for Apache Kafka."""


@main.command()
@settings_options
def run(**values: Any) -> None:
    """Consume documents, tag them, produce their entities; commit only what is delivered."""
    try:
        cfg = WorkerConfig(**values)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    configure_logging(cfg.log_level, cfg.log_format)
    sys.exit(_run_worker(cfg))


def _fail(message: str, code: int) -> int:
    log.error("%s", message)
    click.echo(f"ner-stream: {message}", err=True)
    return code


def tune_interpreter() -> None:
    """Interpreter settings for the worker process, once the model is loaded.

    - The tagging thread releases the GIL inside every torch call (and, with a model process,
      while it waits for a result) and must win it back from the consuming thread, which runs
      pure Python (tokenizing, JSON). CPython hands the GIL over only every switch interval
      (5 ms by default); the model is the bottleneck, so the wait is cut to 0.5 ms.
    - The garbage collector: the start-up heap frozen, collections far apart (`heap.settle`).
    """
    sys.setswitchinterval(0.0005)
    heap.settle()


def _run_worker(cfg: WorkerConfig) -> int:
    log.info("starting ner-stream %s with %s", __version__, cfg.redacted())
    torch.set_num_threads(cfg.model_threads())
    try:
        tagger = Tagger.from_file(cfg.model, TaggerOptions.of(cfg))
    except CheckpointError as e:
        return _fail(str(e), 2)
    except ValueError as e:
        return _fail(str(e), 2)
    log.info("model %s %s (%s) on %s at %s (%s)", tagger.name, tagger.version,
             tagger.info.config.arch, tagger.device, tagger.precision.precision,
             tagger.precision.reason)  # fmt: skip
    warning = tagger.precision.warning(tagger.device)
    if warning:
        log.warning("%s", warning)
    model_process = None
    if cfg.model_process and tagger.device.type == "cpu":
        try:
            model_process = _start_model_process(cfg, tagger)
        except ModelProcessError as e:
            return _fail(str(e), 2)
    tune_interpreter()
    restart = model_process.restart if model_process is not None else None
    close = model_process.close if model_process is not None else None
    try:
        return _serve(cfg, tagger, restart, close)
    finally:
        if model_process is not None:
            model_process.close()


def _start_model_process(cfg: WorkerConfig, tagger: Tagger) -> ModelProcess:
    """Move the model's forward pass into a child process; this one keeps a thread for padding."""
    # The precision already chosen, so that the child cannot decide otherwise. A --model file
    # may be replaced while the worker runs (a model swap): the child loads a copy of it.
    proc = ModelProcess(
        cfg.model or default_model_path(),
        tagger.precision.precision,
        cfg.model_threads(),
        pass_timeout_s=cfg.model_timeout_s,
        private_copy=cfg.model is not None,
    )
    tagger.use_runner(proc)
    torch.set_num_threads(1)
    log.info("model process %d runs the model on %d threads", proc.pid, cfg.model_threads())
    return proc


def _serve(
    cfg: WorkerConfig,
    tagger: Tagger,
    restart_model: Callable[[], None] | None,
    close_model: Callable[[], None] | None = None,
) -> int:
    """The metrics server, the Kafka clients and the worker loop, until a signal stops them.

    `restart_model` replaces a model process that died (None: the model runs in this process);
    `close_model` stops it once a new model is swapped in.
    """
    # Imports here keep `ner-stream tag` and `--help` free of the Kafka client's start-up cost.
    from ner_stream.kafka_io import (
        StartupError,
        connect_admin,
        ensure_topics,
        make_consumer,
        make_producer,
        size_limits,
    )
    from ner_stream.metrics import Health, Metrics, MetricsServer
    from ner_stream.worker import Worker

    metrics, health = Metrics(), Health()
    server = None
    if cfg.metrics_port:
        try:
            server = MetricsServer(metrics, health, cfg.metrics_host, cfg.metrics_port).start()
        except OSError as e:
            return _fail(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {e}", 2)
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, server.port)
    try:
        admin = connect_admin(cfg)
        try:
            ensure_topics(admin, cfg)
            limits = size_limits(admin, cfg)
        finally:
            admin.close()
        consumer = make_consumer(cfg)
        producer = make_producer(cfg)
    except StartupError as e:
        return _fail(str(e), e.exit_code)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("largest output %d bytes, largest dead letter %d bytes", limits.output,
             limits.dead_letter)  # fmt: skip
    swapper = _model_swapper(cfg, tagger, metrics, close_model)
    worker = Worker(cfg, tagger, consumer, producer, metrics, health, limits=limits,
                    restart_model=restart_model, swaps=swapper,
                    new_producer=lambda: make_producer(cfg))  # fmt: skip
    try:
        return worker.run(stop)
    finally:
        if swapper is not None:
            swapper.close()
        if server is not None:
            server.stop()


def _model_swapper(
    cfg: WorkerConfig, tagger: Tagger, metrics: Metrics, close_model: Callable[[], None] | None
) -> ModelSwapper | None:
    """Watch the `--model` file for new models to swap in (see `ner_stream.model_swap`), polling
    every `--model-watch-s` and on SIGHUP; None for the packaged model, which is never swapped."""
    if not cfg.model:
        return None

    def start_runner(candidate: Tagger) -> ModelProcess | None:
        # Where the first model runs, a new one runs too: in a model process of its own, or here.
        if tagger.runner is tagger.local:
            return None
        return _start_model_process(cfg, candidate)

    swapper = ModelSwapper(cfg.model, tagger, metrics, start_runner, cfg.model_watch_s,
                           close_model).start()  # fmt: skip
    signal.signal(signal.SIGHUP, lambda _signum, _frame: swapper.check_now())
    every = f"every {cfg.model_watch_s:g} s and " if cfg.model_watch_s else ""
    log.info("watching %s for a new model to swap in (%son SIGHUP)", cfg.model, every)
    return swapper


def _lines(stream, max_bytes: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a binary stream, decoded as UTF-8.

    A line ends at "\n" only (its "\r\n" or "\n" is removed): a lone "\r" stays in the line,
    which text mode's universal newlines would have cut in two. A byte-order mark before the first
    line is dropped. Raises `click.ClickException` naming the line when it is not valid UTF-8, or
    when it is longer than `max_bytes` (without its line end): such a line is never read whole,
    so that one line without an end in a huge file cannot take the memory.
    """
    name = getattr(stream, "name", "<stdin>")
    # At most the longest line allowed and its "\r\n": one byte more is a line too long.
    read = stream.readline if max_bytes is None else partial(stream.readline, max_bytes + 3)
    for lineno, raw in enumerate(iter(read, b""), 1):
        if max_bytes is not None and len(raw.rstrip(b"\n").removesuffix(b"\r")) > max_bytes:
            raise click.ClickException(
                f"{name}:{lineno}: longer than --max-doc-bytes ({max_bytes:,} bytes)"
            )
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise click.ClickException(
                f"{name}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def read_documents(
    streams, fmt: str, max_bytes: int | None = None
) -> Iterator[tuple[str, str, dict]]:
    """(id, text, pass-through fields) per input line of binary `streams` (lines as in `_lines`,
    at most `max_bytes` each when given).

    `text`: each line is a document; `jsonl`: each line a JSON object with a text; `auto` takes a
    line starting with "{" as JSON and any other as text. A JSON line follows the input rules of
    `run` (`ner_stream.messages`), except that a missing id is the document's number in the
    input. Raises `click.ClickException` naming the line that breaks them.
    """
    n = 0
    for stream in streams:
        name = getattr(stream, "name", "<stdin>")
        for lineno, line in _lines(stream, max_bytes):
            if fmt == "text" or (fmt == "auto" and not line.lstrip().startswith("{")):
                n += 1
                yield str(n), line, {}
                continue
            # Strict JSON as for `run` (no NaN, no unpaired surrogates), so the output is JSON too.
            try:
                obj = parse_json(line)
            except ValueError as e:
                raise click.ClickException(f"{name}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise click.ClickException(f"{name}:{lineno}: expected an object with a text")
            try:
                doc_id = document_id(obj.get("id"))
            except ValueError as e:
                raise click.ClickException(f"{name}:{lineno}: {e}") from None
            n += 1
            yield doc_id or str(n), obj["text"], pass_through(obj)


FORMAT = click.Choice(["auto", "jsonl", "text"])
# Line separators that JSON leaves unescaped but str.splitlines (and JavaScript before ES2019)
# splits on: escaped, so that one output stays one line for every reader.
_LINE_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(obj: object) -> str:
    """``obj`` as one line of JSON: UTF-8 text, with U+0085, U+2028 and U+2029 escaped."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).translate(_LINE_SEPARATORS)


TAG_BATCH_DOCS = 64  # documents per `Tagger.tag` call of `ner-stream tag`
# Tokens per batch of `ner-stream tag`, and per submission of its windows: memory then stays
# bounded by this, not by the documents' sizes (a tokenized document takes ~250 bytes a token).
TAG_BATCH_TOKENS = 16_384
# Submissions of `ner-stream tag` in the model at once: with a model process, it runs them while
# this process reads, tokenizes and writes (docs/benchmarks.md, "Ninth round").
TAG_IN_FLIGHT = 3


def tag_documents(
    tagger: Tagger,
    documents: Iterable[tuple[str, str, dict]],
    batch_docs: int = TAG_BATCH_DOCS,
    on_batch: Callable[[int, int], None] | None = None,
    batch_tokens: int = TAG_BATCH_TOKENS,
    in_flight: int = TAG_IN_FLIGHT,
) -> Iterator[dict[str, Any]]:
    """The output object of each of `documents` ((id, text, pass-through fields) each, as
    `read_documents` yields them), in input order: ``{"id", "entities", "meta"?}`` as
    `messages.output_object` builds it.

    Lazy: documents are read, tokenized and tagged in batches of `batch_docs` documents or
    `batch_tokens` tokens, whichever comes first (a longer document alone), with their windows
    submitted `batch_tokens` at a time and up to `in_flight` submissions in the model at once
    (`Tagger.tag_batches`); memory thus follows `batch_tokens x in_flight`, not the input. After
    each batch, `on_batch(documents, tokens)` is called, if given.
    Raises ValueError when `batch_docs`, `batch_tokens` or `in_flight` < 1, and whatever reading
    `documents` or the model raises.
    """
    if batch_docs < 1 or batch_tokens < 1:
        raise ValueError("batch_docs and batch_tokens must be at least 1")
    batches = (
        (batch, [p for _, p, _ in batch])
        for batch in _prepared_batches(tagger, documents, batch_docs, batch_tokens)
    )
    for batch, results, stats in tagger.tag_batches(batches, batch_tokens, in_flight):
        if on_batch is not None:
            on_batch(len(batch), stats.real_tokens)
        for (doc_id, _, meta), entities in zip(batch, results, strict=True):
            yield output_object(doc_id, entities, meta)


def _prepared_batches(
    tagger: Tagger, documents: Iterable[tuple[str, str, dict]], max_docs: int, max_tokens: int
) -> Iterator[list[tuple[str, Any, dict]]]:
    """(id, prepared document, pass-through fields) of `documents`, in batches of at most
    `max_docs` documents and `max_tokens` tokens (a longer document alone), read lazily. When
    reading `documents` raises, the documents read before it are still yielded, then the error
    is raised."""
    batch: list[tuple[str, Any, dict]] = []
    tokens = 0
    try:
        for doc_id, text, meta in documents:
            prepared = tagger.prepare(text)
            n = prepared.num_tokens
            if batch and tokens + n > max_tokens:
                yield batch
                batch, tokens = [], 0
            batch.append((doc_id, prepared, meta))
            tokens += n
            if len(batch) == max_docs:
                yield batch
                batch, tokens = [], 0
    except Exception:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def _bytes_read(streams: Sequence) -> tuple[int | None, Callable[[], int]]:
    """The total size of `streams` when every one is a regular file (else None), and a function
    giving how many of their bytes have been read so far."""
    sizes = []
    for stream in streams:
        try:
            sizes.append(os.fstat(stream.fileno()).st_size if stream.seekable() else None)
        except (AttributeError, OSError, ValueError):
            sizes.append(None)
    if any(size is None for size in sizes):
        return None, lambda: 0
    return sum(sizes), lambda: sum(stream.tell() for stream in streams)


def _show_progress(streams: Sequence, stderr_is_tty: bool) -> bool:
    """The default of --progress: on when the inputs are files and stderr is a terminal."""
    return bool(streams) and stderr_is_tty and _bytes_read(streams)[0] is not None


def tag_streams(
    model: str | Path | None,
    options: TaggerOptions,
    streams: Sequence,
    fmt: str = "auto",
    batch_docs: int = TAG_BATCH_DOCS,
    output: Path | None = None,
    progress: bool | None = False,
    max_doc_bytes: int | None = None,
    model_process: bool = False,
    model_threads: int = 1,
) -> None:
    """`ner-stream tag`: write one JSON line (`json_line`) per document of the binary `streams`
    (stdin when empty), read as `read_documents` reads them and tagged by `tag_documents`, in
    input order, to stdout or to the file `output`.

    `output` is written as ``<output>.partial`` and renamed when every document is written, so
    a file of that name is always whole; after an error the partial file is left, and named.
    `progress` shows documents, tokens/s and the time left on stderr (`TagProgress`); None:
    when the inputs are files and stderr is a terminal. `model` is a model file (None: the
    packaged model). Lines longer than `max_doc_bytes` are refused (see `_lines`). A warning
    about the chosen precision goes to stderr. With `model_process` and a model on the CPU, the
    network and the CRF run in a child process (`ModelProcess`, `model_threads` torch threads)
    while this one reads, tokenizes and writes; until that child has started, this process runs
    them itself (`LocalUntilStarted`). Raises
    `click.ClickException` for a model file or options that cannot be used, for an output file
    that cannot be written, for an input line that cannot be read, and for a model process that
    fails to start or dies.
    """
    try:
        tagger = Tagger.from_file(model, options)
    except (CheckpointError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    warning = tagger.precision.warning(tagger.device)
    if warning:
        click.echo(f"ner-stream: {warning}", err=True)
    process = None
    if model_process and tagger.device.type == "cpu":
        try:
            process = ModelProcess(model or default_model_path(), tagger.precision.precision,
                                   model_threads, wait=False)  # fmt: skip
        except ModelProcessError as e:
            raise click.ClickException(str(e)) from None
        # The first passes run here while the child starts on the other core.
        tagger.use_runner(LocalUntilStarted(tagger.local, process))
        torch.set_num_threads(1)
    heap.settle()
    try:
        _tag_to(tagger, streams, fmt, batch_docs, output, progress, max_doc_bytes)
    finally:
        if process is not None:
            process.close()


def _tag_to(
    tagger: Tagger,
    streams: Sequence,
    fmt: str,
    batch_docs: int,
    output: Path | None,
    progress: bool | None,
    max_doc_bytes: int | None,
) -> None:
    """`tag_streams` once the model is loaded."""
    streams = streams or (click.open_file("-", "rb"),)
    stderr = sys.stderr
    if progress is None:
        progress = _show_progress(streams, stderr.isatty())
    on_batch = None
    if progress:
        total, bytes_read = _bytes_read(streams)
        meter = TagProgress(total, time.monotonic())
        ending = "\r" if stderr.isatty() else "\n"

        def on_batch(documents: int, tokens: int) -> None:
            line = meter.advance(documents, tokens, bytes_read(), time.monotonic())
            if line is not None:
                stderr.write(line + ("\x1b[K" if ending == "\r" else "") + ending)
                stderr.flush()

    def outputs() -> Iterator[dict[str, Any]]:
        documents = read_documents(streams, fmt, max_doc_bytes)
        try:
            yield from tag_documents(tagger, documents, batch_docs, on_batch)
        except ModelProcessError as e:
            raise click.ClickException(f"the model process failed: {e}") from None

    if output is None:
        for out in outputs():
            click.echo(json_line(out))
    else:
        _write_lines(output, (json_line(out) for out in outputs()))
    if progress:
        stderr.write(meter.line(time.monotonic()) + "\n")


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    """Write `lines` to `path` through ``<path>.partial``, renamed when all are written."""
    partial = path.with_name(path.name + ".partial")
    try:
        f = open(partial, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
    except OSError as e:
        raise click.ClickException(f"cannot write {partial}: {e.strerror}") from None
    try:
        with f:
            for line in lines:
                f.write(line + "\n")
    except click.ClickException as e:
        e.message += f" (the documents before it are in {partial})"
        raise
    except OSError as e:
        raise click.ClickException(f"cannot write {partial}: {e.strerror}") from None
    os.replace(partial, path)


@main.command()
@setting_option("model", type=click.Path(dir_okay=False))
@setting_option("device")
@click.option("--format", "fmt", type=FORMAT, default="auto", show_default=True,
              help="Input lines: JSON objects with a text, plain text, or either.")  # fmt: skip
@setting_option("precision", type=click.Choice(PRECISIONS))
@setting_option("max_f1_change", type=click.FloatRange(0))
@setting_option("line_breaks", type=click.Choice(LINE_BREAK_MODES))
@click.option("--batch-docs", type=click.IntRange(1), default=TAG_BATCH_DOCS, show_default=True)
@setting_option("max_doc_bytes", type=click.IntRange(1), help="Longest input line, in bytes (as "
                "`run`'s limit on a record); a longer one stops tag, naming it, without reading "
                "it whole.")  # fmt: skip
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON lines to this file (through FILE.partial, renamed when "
              "done) instead of stdout.")  # fmt: skip
@click.option("--progress/--no-progress", default=None,
              help="Documents, tokens/s and time left on stderr [default: on when the inputs "
              "are files and stderr is a terminal].")  # fmt: skip
@setting_option("torch_threads", help="CPU threads for the model (0: every core but one with "
                "the model process, else torch's default, one per core).")  # fmt: skip
@setting_option("model_process", help="On the CPU, run the model in a child process of its own "
                "while this one reads, tokenizes and writes.")  # fmt: skip
@click.argument("inputs", nargs=-1, type=click.File("rb"))
def tag(
    model, device, precision, max_f1_change, line_breaks, fmt, batch_docs, max_doc_bytes, output,
    progress, torch_threads, model_process, inputs,
) -> None:  # fmt: skip
    """Tag text or JSONL from files or stdin; print one JSON object per document. No Kafka.

    Each output is {"id", "entities", "meta"}: a JSON line's fields other than id and text are
    nested under "meta" (left out when there are none), as in the output of `run`. Outputs
    come in input order; memory stays bounded however large the input (see --max-doc-bytes).
    """
    if torch_threads < 0:
        raise click.BadParameter("must not be negative", param_hint="--torch-threads")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    options = TaggerOptions(
        device=device, precision=precision, max_f1_change=max_f1_change, line_breaks=line_breaks
    )
    threads = WorkerConfig(torch_threads=torch_threads).model_threads()
    tag_streams(model, options, inputs, fmt, batch_docs, output, progress, max_doc_bytes,
                model_process, threads)  # fmt: skip


@main.command()
@click.option("--bootstrap-servers", default=BOOTSTRAP.default, envvar=BOOTSTRAP.envvar,
              show_default=True)  # fmt: skip
@click.option("--topic", default=WorkerConfig.input_topic, show_default=True,
              envvar=SETTINGS_BY_NAME["input_topic"].envvar)  # fmt: skip
@click.option("--format", "fmt", type=FORMAT, default="auto", show_default=True)
@click.option("--repeat", type=click.IntRange(1), default=1, show_default=True,
              help="Send the input N times (later rounds add #round to the ids).")  # fmt: skip
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@security_options
def produce(bootstrap_servers, topic, fmt, repeat, inputs, **security) -> None:
    """Send JSONL or text lines to the input topic, keyed by document id.

    Exits 2 for bad settings and 3 when Kafka cannot be reached or refuses the credentials or
    the certificate check, as `run` does.
    """
    from ner_stream.kafka_io import make_producer

    cfg = _client_config(bootstrap_servers=bootstrap_servers, input_topic=topic, **security)
    _check_connection(cfg)
    producer = make_producer(cfg)
    sent = 0
    t0 = time.monotonic()
    for round_ in range(repeat):
        streams = [p.open("rb") for p in inputs] or [click.open_file("-", "rb")]
        docs = list(read_documents(streams, fmt))
        with click.progressbar(docs, label=f"producing to {topic}", file=sys.stderr) as bar:
            for doc_id, text, extra in bar:
                doc_id = doc_id if round_ == 0 else f"{doc_id}#{round_}"
                value = json.dumps({"id": doc_id, "text": text, **extra}, ensure_ascii=False)
                producer.send(topic, value=value.encode(), key=doc_id.encode())
                sent += 1
    producer.flush()
    producer.close()
    click.echo(f"sent {sent} documents to {topic} in {time.monotonic() - t0:.1f} s", err=True)


@main.command()
@click.option("--bootstrap-servers", default=BOOTSTRAP.default, envvar=BOOTSTRAP.envvar,
              show_default=True)  # fmt: skip
@click.option("--topic", default=WorkerConfig.output_topic, show_default=True,
              envvar=SETTINGS_BY_NAME["output_topic"].envvar)  # fmt: skip
@click.option("--max-messages", type=click.IntRange(1), help="Stop after this many.")
@click.option("--idle-timeout-s", type=float, default=10.0, show_default=True,
              help="Stop when nothing arrives for this long.")  # fmt: skip
@click.option("--pretty", is_flag=True, help="One line per entity instead of raw JSON.")
@click.option("--isolation", type=click.Choice(["read_committed", "read_uncommitted"]),
              default="read_committed", show_default=True,
              help="read_committed: only outputs of committed transactions (exactly-once "
                   "workers); read_uncommitted: also those of open or aborted ones.")  # fmt: skip
@security_options
def consume(
    bootstrap_servers, topic, max_messages, idle_timeout_s, pretty, isolation, **security
) -> None:
    """Print the output topic from the beginning (no consumer group, nothing committed).

    Exits 2 for bad settings and 3 when Kafka cannot be reached or refuses the credentials or
    the certificate check, as `run` does.
    """
    from kafka import KafkaConsumer

    cfg = _client_config(bootstrap_servers=bootstrap_servers, output_topic=topic, **security)
    _check_connection(cfg)
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(idle_timeout_s * 1000),
        isolation_level=isolation,
        **cfg.kafka_security(),
    )
    seen = 0
    try:
        for record in consumer:
            value = record.value.decode("utf-8", errors="replace")
            click.echo(_pretty(value) if pretty else value)
            seen += 1
            if max_messages and seen >= max_messages:
                break
    finally:
        consumer.close()


def _client_config(**values: Any) -> WorkerConfig:
    """The configuration of `produce` or `consume`; a bad setting exits 2 with its sentence."""
    try:
        return WorkerConfig(**values)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _check_connection(cfg: WorkerConfig) -> None:
    """Reach Kafka as `run` does (`kafka_io.connect_admin`): exit 3 with one sentence when it
    cannot be reached in --connect-timeout-s or refuses the credentials or the certificate."""
    from ner_stream.kafka_io import StartupError, connect_admin

    try:
        connect_admin(cfg).close()
    except StartupError as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(e.exit_code) from None


def _pretty(value: str) -> str:
    try:
        out = json.loads(value)
        ents = ", ".join(f"{e['text']} [{e['type']} {e['score']:.2f}]" for e in out["entities"])
        return f"{out['id']}: {ents or '(no entities)'}"
    except (ValueError, KeyError, TypeError):
        return value


if __name__ == "__main__":
    main()
