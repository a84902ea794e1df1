"""Reproductions of defects found while trying the seam redesign as a newcomer.

Every test here FAILS on the commit it was written against: each one is the reproduction of one
finding (see the docstring of each). The worker tests use only the in-memory stand-ins of
`tests.fakes`; the last two run the command lines (CliRunner, one `python -m`). Several defects are
older than the redesign (d9905ab has them too); the docstrings do not say which.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, replace

from click.testing import CliRunner
from kafka.errors import MessageSizeTooLargeError

from ner_stream import cli as stream_cli
from ner_stream.batching import BatchLimits
from ner_stream.checkpoint import save
from ner_stream.scheduler import Scheduler, pieces_of
from ner_stream.worker import Worker
from tests.fakes import FakeConsumer, FakeProducer, make_tagger, rigged_model, wait_for
from tests.unit.test_worker import CFG, DLQ, IN, OUT, Running, doc
from training import cli as train_cli

# ----------------------------------------------------------------------------- worker + delivery


def test_a_failed_output_of_a_partition_that_moved_away_is_not_dead_lettered_here():
    """`Job.live` is "the one rule by which work of a revoked partition is dropped, wherever it
    is" (docs/architecture.md), but `Delivery.apply_acks` only drops a late report when the
    partition is owned again (`owner is not None and owner is not ack.part`). A failed output
    whose report arrives after its partition went to another worker is turned into a dead letter
    here, for a record this worker no longer owns and never commits; the new owner reads it again
    and answers it too.
    """
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)

    def fail(topic: str, value: bytes | None) -> BaseException | None:
        return MessageSizeTooLargeError("too large for the topic") if topic == OUT else None

    consumer, producer = FakeConsumer(partitions=2), FakeProducer(hold=True, fail=fail)
    consumer.append(0, doc("moved", "Peter ."))
    running = Running(Worker(CFG, tagger, consumer, producer))
    wait_for(lambda: producer.pending() == 1, what="the output sent (held)")
    consumer.rebalance(revoke=[0], assign=[1])  # partition 0 goes to another worker
    wait_for(lambda: consumer.assignment() == {(IN, 1)}, what="partition 0 to go")
    producer.hold = False
    producer.release()  # the report of the output comes now: refused, too large
    time.sleep(0.2)
    assert running.stop() == 0
    assert producer.delivered(DLQ) == [], "dead letter sent for a partition owned by another worker"


def test_a_refused_dead_letter_of_a_partition_that_moved_away_is_not_sent_again_here():
    """The same gap for the dead-letter retry: a dead letter refused as too large whose report
    arrives after its partition was revoked (and not given back) is sent again, cut to
    TIGHT_DEAD_LETTER_BYTES, by a worker that no longer owns the record."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    consumer = FakeConsumer(partitions=2)
    producer = FakeProducer(hold=True, max_request_size=2_000_000, topic_limits={DLQ: 50_000})
    consumer.append(0, b"\xff" + b"y" * 200_000)  # invalid UTF-8: a dead letter of ~200 kB
    cfg = replace(CFG, max_doc_bytes=1_500_000)
    running = Running(Worker(cfg, tagger, consumer, producer))
    wait_for(lambda: producer.pending() == 1, what="the dead letter sent (held)")
    consumer.rebalance(revoke=[0], assign=[1])
    wait_for(lambda: consumer.assignment() == {(IN, 1)}, what="partition 0 to go")
    producer.hold = False
    producer.release()  # refused by the topic: too large
    time.sleep(0.2)
    assert running.stop() == 0
    assert [s.topic for s in producer.sent] == [DLQ], "dead letter re-sent for a revoked partition"


# ------------------------------------------------------------------------------------- scheduler


@dataclass(eq=False)
class Doc:
    name: str
    live: bool = True


def test_a_micro_batch_never_holds_more_than_its_limits_when_a_long_piece_rides_along():
    """docs/architecture.md (Words: micro-batch) and batching.py say a micro-batch holds at most
    --max-batch-docs documents and --max-batch-tokens real tokens. `Scheduler.take` appends a
    long document's piece (up to half the token budget) to a batch that is already full, so a
    batch reaches 1.5x the token limit and max_docs + 1 documents."""
    s = Scheduler(BatchLimits(max_docs=2, max_tokens=100, max_wait_s=0.5))
    s.add(pieces_of(Doc("long"), [50] * 4, s.piece_tokens), 0.0)
    for name in ("a", "b"):
        s.add(pieces_of(Doc(name), [50], s.piece_tokens), 0.0)
    batch = s.take(0.0, model_free=False, idle=False, stopping=False)
    assert batch is not None
    assert len(batch) <= 2, [p.job.name for p in batch]
    assert sum(p.tokens for p in batch) <= 100


def test_the_open_batch_never_grows_past_max_docs_whatever_the_caller_does():
    """`Scheduler.add` only closes the open batch on the token budget; the document limit holds
    only if the caller calls `take` after every `add` (undocumented). A policy or a test that adds
    several documents before taking gets a batch of any size."""
    s = Scheduler(BatchLimits(max_docs=2, max_tokens=100, max_wait_s=0.5))
    fulls = [s.add(pieces_of(Doc(f"d{i}"), [5], s.piece_tokens), 0.0) for i in range(5)]
    batch = s.take(0.0, model_free=True, idle=False, stopping=False)
    sizes = [len(f) for f in fulls if f] + [len(batch or [])]
    assert max(sizes) <= 2, sizes


# ---------------------------------------------------------------------------------------- tagger


def test_tag_prepared_gives_each_document_its_own_entities_even_when_one_is_passed_twice():
    """`Tagger.tag_prepared` maps results back with `id(doc)`: the same PreparedDoc twice in the
    list leaves the first slot empty and gives the second the entities twice."""
    tagger = make_tagger("rigged")
    d = tagger.prepare("Peter went to Paris .")
    out, _ = tagger.tag_prepared([d, d])
    assert [[e.text for e in x] for x in out] == [["Peter", "Paris"], ["Peter", "Paris"]]


class SlowRunner:
    """Runs each call in this process after `delay_s` (a slow model); `fast()` drops the delay."""

    def __init__(self, tagger, delay_s: float) -> None:
        self.tagger, self.delay_s, self.calls = tagger, delay_s, 0

    def __call__(self, batches, rows):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.tagger.local(batches, rows)

    def fast(self) -> None:
        self.delay_s = 0.0


def test_backpressure_bounds_the_documents_held_when_every_document_is_long():
    """The long-document lane (`Scheduler._long`) is outside backpressure and unbounded. While
    the work queue holds jobs the tagging thread never counts as idle, so a lone long piece is
    never taken (`take`: `self._long and idle`), and with no short documents no batch goes for a
    piece to ride along with: the thread drains the whole work queue into the lane, the consumer
    resumes, and so on. Under a stream of documents of more than one piece (more than
    --max-batch-tokens / 2 tokens, about 4096 by default) the worker reads its partitions without
    bound while the model gets one half-empty micro-batch per pass."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = SlowRunner(tagger, delay_s=0.02)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    text = " ".join(["Peter went to Paris ."] * 6)  # 6 windows of 5 tokens: two pieces of <= 24
    n = 300
    for i in range(n):
        consumer.append(0, doc(f"d{i}", text))
    cfg = replace(CFG, queue_docs=4, max_batch_docs=2, max_batch_tokens=48)
    worker = Worker(cfg, tagger, consumer, producer)
    running = Running(worker)
    # Bound: the queue, one poll read ahead (4 x max_batch_docs), two micro-batches in the model.
    bound = cfg.queue_docs + 4 * cfg.max_batch_docs + 2 * cfg.max_batch_docs
    held = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        held = max(held, worker.delivery.in_flight())
        time.sleep(0.01)
    runner.fast()
    try:
        assert held <= bound, f"{held} documents consumed and not answered (bound {bound})"
    finally:
        assert running.stop() == 0


class BrokenBackend:
    """A runner (say ONNX Runtime) whose session is gone: every call raises the backend's own
    error, as onnxruntime does after a CUDA fault."""

    def __call__(self, batches, rows):
        raise RuntimeError("onnxruntime: CUDA failure 700: an illegal memory access")


def test_a_runner_that_fails_on_every_pass_does_not_dead_letter_the_whole_stream():
    """Only `model_process.ModelProcessError` means "the runner died" to the tagging stage
    (restart, one by one, a probe, `model_crash`, stop when it dies on any input). Any other
    error from a runner is a batch failure: each document alone, then a `processing_error` dead
    letter and a commit. A new runner (runner.py) whose backend is dead therefore dead-letters
    and commits every document while the worker reports success, unless it raises an error class
    from model_process.py."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    tagger.use_runner(BrokenBackend())
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(10):
        consumer.append(0, doc(f"d{i}", "Peter went to Paris ."))
    running = Running(Worker(CFG, tagger, consumer, producer, restart_model=lambda: None))
    running.thread.join(3)
    code = running.stop()
    assert len(producer.delivered(DLQ)) < 10, "every document dead-lettered and committed"
    assert code == 1


# ------------------------------------------------------------------------------------------- cli


def test_ner_train_predict_is_ner_stream_tag_format_text_by_another_name(tmp_path):
    """`ner-train predict` says it is `ner-stream tag --format text` "by another name", with
    `ner-stream tag`'s defaults; but `tag` reads its settings from NER_STREAM_* variables and
    `predict` does not, so in the same environment (a worker's container, deploy/k8s's
    configmap) the two tag with different models or options."""
    loaded = rigged_model()
    model = tmp_path / "rigged.nerm"
    save(model, loaded.model, loaded.info)
    text = tmp_path / "in.txt"
    text.write_text("Peter went to Paris .\n", encoding="utf-8")
    env = {"NER_STREAM_MODEL": str(model)}
    tagged = CliRunner().invoke(stream_cli.main, ["tag", "--format", "text", str(text)], env=env)
    predicted = CliRunner().invoke(train_cli.main, ["predict", str(text)], env=env)
    assert tagged.exit_code == 0 and predicted.exit_code == 0
    assert predicted.output == tagged.output


def test_python_dash_m_ner_stream_cli_runs_the_command_line():
    """`python -m ner_stream.cli tag FILE` (the way the brief and a newcomer run it) prints
    nothing and exits 0: cli.py has no `if __name__ == "__main__"` and there is no
    ner_stream/__main__.py."""
    done = subprocess.run([sys.executable, "-m", "ner_stream.cli", "--help"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0
    assert "Usage" in done.stdout, (done.stdout, done.stderr)
