"""The model in a child process: same entities as in-process, passes in flight, failures,
restarts, the restart window and the crash hook for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ner_stream import model_process
from ner_stream.batching import pad_batch
from ner_stream.checkpoint import save
from ner_stream.model_process import (
    CRASH_WORD_ENV,
    HANG_WORD_ENV,
    MAX_RESTARTS,
    RESTART_WINDOW_S,
    LocalUntilStarted,
    ModelProcess,
    ModelProcessError,
    RestartWindow,
)
from ner_stream.precision import PrecisionCheck, with_check
from ner_stream.tagger import Tagger, TaggerOptions
from tests.fakes import random_model, wait_for

TEXTS = [
    "Peter went to Paris and the Peter went .",
    "Paris .",
    "",
    "the the the Peter to Paris " * 12,
    "Ünïcödé Peter went to Paris 🇫🇷 .",
]
OPTIONS = TaggerOptions(device="cpu", max_chunk_tokens=32, max_pass_tokens=256)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    loaded = random_model(seed=3)
    path = tmp_path_factory.mktemp("model") / "random.nerm"
    save(path, loaded.model, loaded.info)
    return path


@pytest.fixture(scope="module")
def process(model_file):
    proc = ModelProcess(model_file, "fp32", threads=1)
    yield proc
    proc.close()


def test_entities_from_the_model_process_equal_those_of_the_process_itself(model_file, process):
    here = Tagger.from_file(model_file, OPTIONS)
    expected = here.tag(TEXTS * 3)
    remote = Tagger.from_file(model_file, OPTIONS)
    remote.use_runner(process)
    assert remote.tag(TEXTS * 3) == expected
    assert sum(map(len, expected)) > 0


def test_several_passes_in_flight_are_answered_in_order(model_file, process):
    tagger = Tagger.from_file(model_file, OPTIONS)
    docs = [[tagger.prepare(t)] for t in TEXTS]
    expected = [tagger.tag_prepared(d)[0] for d in docs]
    tagger.use_runner(process)
    pending = [tagger.submit([(d[0], c) for c in range(len(d[0].windows))]) for d in docs]
    # Collected newest first: each waits for the answers ahead of it.
    results = [p.result()[0] for p in reversed(pending)][::-1]
    for got, want, d in zip(results, expected, docs, strict=True):
        assert [e for chunk in got for e in chunk] == want[0], d[0].text
    stats = pending[0].result()[1]
    assert stats.inference_s > 0
    assert stats.real_tokens == docs[0][0].num_tokens


def test_a_model_file_that_cannot_be_loaded_fails_at_start(tmp_path):
    bad = tmp_path / "bad.nerm"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelProcessError, match="could not load the model"):
        ModelProcess(bad, "fp32", threads=1)


def test_a_dead_model_process_is_an_error_of_its_own(model_file):
    proc = ModelProcess(model_file, "fp32", threads=1)
    tagger = Tagger.from_file(model_file, OPTIONS)
    tagger.use_runner(proc)
    assert tagger.tag(["Peter went to Paris ."]) is not None
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(ModelProcessError, match="stopped"):
        tagger.tag(["Peter went to Paris ."])
    proc.close()


def test_close_stops_the_child(model_file):
    proc = ModelProcess(model_file, "fp32", threads=1)
    proc.close()
    assert proc._process.poll() == 0


def test_the_child_exits_when_its_parent_is_gone(model_file):
    proc = ModelProcess(model_file, "fp32", threads=1)
    proc._conn.close()  # what the kernel does to the parent's end when the parent dies
    deadline = time.monotonic() + 10
    while proc._process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc._process.poll() == 0


def test_without_wait_the_child_starts_beside_the_caller_and_then_takes_passes(model_file):
    proc = ModelProcess(model_file, "fp32", threads=1, wait=False)
    try:
        assert proc.started(wait=True)
        assert proc.digest is not None
        tagger = Tagger.from_file(model_file, OPTIONS)
        expected = tagger.tag(TEXTS)
        tagger.use_runner(proc)
        assert tagger.tag(TEXTS) == expected
    finally:
        proc.close()
    assert proc._process.returncode == 0  # a started child is asked to stop


def test_a_child_still_starting_is_killed_by_close_without_waiting_for_it(model_file):
    proc = ModelProcess(model_file, "fp32", threads=1, wait=False)
    proc.close()
    assert proc._process.returncode == -signal.SIGKILL


def test_a_model_that_cannot_be_loaded_fails_when_started_without_wait(tmp_path):
    bad = tmp_path / "bad.nerm"
    bad.write_bytes(b"not a model")
    proc = ModelProcess(bad, "fp32", threads=1, wait=False)
    with pytest.raises(ModelProcessError, match="could not load the model"):
        proc.started(wait=True)
    assert proc._process.poll() is not None
    # Asked again, or given a pass, it is still the model process's error (which the tagging
    # stage treats as a dead model), not an error of the passes.
    with pytest.raises(ModelProcessError, match="stopped"):
        proc.started()
    with pytest.raises(ModelProcessError, match="stopped"):
        proc([], [])


def test_a_child_whose_parent_is_gone_while_it_loads_exits(model_file):
    proc = ModelProcess(model_file, "fp32", threads=1, wait=False)
    proc._conn.close()  # the parent died or gave up before the child was ready
    deadline = time.monotonic() + 60
    while proc._process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    code = proc._process.poll()
    if code is None:
        proc._process.kill()
    assert code == 0


class Starting:
    """A model process that starts after `calls` looks at it, running passes as `runner` does."""

    def __init__(self, runner, calls: int) -> None:
        self.runner, self.calls, self.ran = runner, calls, 0

    def started(self) -> bool:
        self.calls -= 1
        return self.calls < 0

    def __call__(self, batches, rows):
        self.ran += 1
        return self.runner(batches, rows)


def test_passes_run_here_until_the_model_process_has_started_then_there(model_file):
    tagger = Tagger.from_file(model_file, OPTIONS)
    docs = [tagger.prepare(t) for t in TEXTS * 4]
    expected = [tagger.tag_prepared([d])[0][0] for d in docs]
    local_calls: list[int] = []

    def local(batches, rows):
        local_calls.append(len(batches))
        return tagger.local(batches, rows)

    process = Starting(tagger.local, calls=3)
    tagger.use_runner(LocalUntilStarted(local, process))
    batches = [(i, [d]) for i, d in enumerate(docs)]
    got = [out[0] for _, out, _ in tagger.tag_batches(batches, 1000, in_flight=3)]
    assert got == expected
    assert len(local_calls) == 3 and process.ran > 0


def test_a_pass_that_fails_in_the_child_fails_alone(model_file, process):
    tagger = Tagger.from_file(model_file, OPTIONS)
    tagger.use_runner(process)
    batch = pad_batch([tagger.vocabs.encode(["Peter", "went"])], pad_to=8)
    batch.words[0, 0] = 10**6  # no such word id: the embedding lookup fails
    with pytest.raises(RuntimeError, match="failed on a pass") as failure:
        process([batch], [1]).get()
    assert not isinstance(failure.value, ModelProcessError)
    assert tagger.tag(["Peter went to Paris ."]) == Tagger.from_file(model_file, OPTIONS).tag(
        ["Peter went to Paris ."]
    )


def test_the_model_process_runs_the_precision_it_is_given(tmp_path):
    loaded = random_model(seed=3)
    loaded.info.extra = with_check(
        {}, PrecisionCheck("bf16", 90.0, 90.0, "dev.txt", "ab" * 32, 10, "cpu")
    )
    path = tmp_path / "checked.nerm"
    save(path, loaded.model, loaded.info)
    options = replace(OPTIONS, precision="bf16")
    here = Tagger.from_file(path, options)
    fp32 = Tagger.from_file(path, replace(OPTIONS, precision="fp32")).tag(TEXTS)
    expected = here.tag(TEXTS)
    # bf16 rounds the scores: a pass in the child at fp32 would give those of `fp32`.
    assert [[e.score for e in d] for d in expected] != [[e.score for e in d] for d in fp32]
    proc = ModelProcess(path, "bf16", threads=1)
    try:
        remote = Tagger.from_file(path, options)
        remote.use_runner(proc)
        assert remote.tag(TEXTS) == expected
    finally:
        proc.close()


def test_a_failing_pass_among_passes_in_flight_fails_alone_and_in_its_place(model_file, process):
    # The child runs one pass's network while it decodes the one before: a pass that fails in
    # the network must not overtake, delay or break the answers around it.
    tagger = Tagger.from_file(model_file, OPTIONS)
    good = pad_batch([tagger.vocabs.encode(["Peter", "went", "to", "Paris"])], pad_to=8)
    bad = pad_batch([tagger.vocabs.encode(["Peter", "went"])], pad_to=8)
    bad.words[0, 0] = 10**6
    done = tagger.local([good], [1])
    expected = (done.tags, done.scores)
    replies = [process([b], [1]) for b in (good, bad, good, good)]
    outcomes = []
    for reply in replies:
        try:
            got = reply.get()
            outcomes.append((got.tags.tolist(), got.scores.tolist()))
        except RuntimeError:
            outcomes.append("failed")
    want = (expected[0].tolist(), expected[1].tolist())
    assert outcomes == [want, "failed", want, want]


def test_a_dead_child_is_replaced_by_restart_and_its_lost_passes_fail(
    model_file, tmp_path, monkeypatch
):
    path = tmp_path / "model.nerm"
    path.write_bytes(model_file.read_bytes())
    monkeypatch.setenv(CRASH_WORD_ENV, "AND")  # looked up as the vocabulary does: lowercased
    proc = ModelProcess(path, "fp32", threads=1)
    try:
        tagger = Tagger.from_file(path, OPTIONS)
        expected = tagger.tag(["Peter went to Paris ."])
        tagger.use_runner(proc)
        assert tagger.tag(["Peter went to Paris ."]) == expected  # the hook's word absent
        # Killed while idle: the next pass finds it gone.
        old_pid = proc.pid
        os.kill(old_pid, signal.SIGKILL)
        proc._process.wait(10)
        with pytest.raises(ModelProcessError, match="stopped"):
            tagger.tag(["Peter went to Paris ."])
        proc.restart()
        assert proc.pid != old_pid
        assert tagger.tag(["Peter went to Paris ."]) == expected
        # Killed by the hook with a pass in flight: the pass is settled as lost, and stays lost
        # after the restart, whose own passes are not mixed up with it.
        marked = pad_batch([tagger.vocabs.encode(["Peter", "and"])], pad_to=8)
        lost = proc([marked], [1])
        wait_for(lost.ready, what="the lost pass to settle")
        with pytest.raises(ModelProcessError, match=r"stopped \(exit code -9\)"):
            lost.get()
        proc.restart()
        assert tagger.tag(["Peter went to Paris ."]) == expected
        with pytest.raises(ModelProcessError):
            lost.get()
        # A child that cannot start again is an error too: the model file is gone, or it is not
        # the model that the parent's tagger encodes for any more.
        os.kill(proc.pid, signal.SIGKILL)
        path.unlink()
        with pytest.raises(ModelProcessError, match="could not load the model"):
            proc.restart()
        path.write_bytes(b"not this model any more")
        with pytest.raises(ModelProcessError, match="changed since the worker started"):
            proc.restart()
    finally:
        proc.close()


def test_with_a_private_copy_a_restart_brings_back_the_model_whatever_the_file_holds(
    model_file, tmp_path
):
    """For a --model file that may be replaced while the worker runs (a model swap): the child,
    and every restart, load a copy made at the first start."""
    path = tmp_path / "model.nerm"
    path.write_bytes(model_file.read_bytes())
    proc = ModelProcess(path, "fp32", threads=1, private_copy=True)
    try:
        tagger = Tagger.from_file(path, OPTIONS)
        expected = tagger.tag(TEXTS)
        tagger.use_runner(proc)
        path.write_bytes(b"a refused candidate")
        os.kill(proc.pid, signal.SIGKILL)
        proc._process.wait(10)
        proc.restart()
        assert tagger.tag(TEXTS) == expected
        path.unlink()
        proc.restart()
        assert tagger.tag(TEXTS) == expected
    finally:
        proc.close()


def _copies() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("ner-stream-model-*")}


def test_the_private_copy_leaves_nothing_on_disk_even_when_the_worker_is_killed(model_file):
    """A crash-looping worker must not fill the disk with copies of its model."""
    before = _copies()
    script = (
        "import sys, time; from ner_stream.model_process import ModelProcess; "
        f"p = ModelProcess({str(model_file)!r}, 'fp32', threads=1, private_copy=True); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _copies() == before  # no name on disk while it runs
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), 15,
                 "the orphaned model process to exit")  # fmt: skip
    finally:
        parent.kill()
    assert _copies() == before


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_where_proc_is_missing_the_copy_lies_in_a_folder_that_close_removes(
    model_file, monkeypatch
):
    monkeypatch.setattr(model_process, "PROC_FD", "/nonexistent/fd")
    proc = ModelProcess(model_file, "fp32", threads=1, private_copy=True)
    try:
        folder = Path(proc._copy_dir)
        assert [p.name for p in folder.iterdir()] == [model_file.name]
    finally:
        proc.close()
    assert not folder.exists()


def test_the_crash_hook_refuses_a_word_the_model_does_not_know(model_file, monkeypatch):
    monkeypatch.setenv(CRASH_WORD_ENV, "zebra")
    with pytest.raises(ModelProcessError, match=f"{CRASH_WORD_ENV}='zebra' is not in the"):
        ModelProcess(model_file, "fp32", threads=1)


def test_the_restart_window_step_by_step():
    window = RestartWindow(limit=2, window_s=10.0)
    assert window.allow(100.0)
    assert window.allow(105.0)
    assert not window.allow(109.9)  # a third within 10 s of the other two
    assert window.recent(109.9) == 2  # a refused restart is not counted
    assert window.allow(110.0)  # the one at 100 s has left the window
    assert not window.allow(114.9)  # 105 and 110 are in it
    assert window.recent(114.9) == 2
    assert window.allow(120.0)  # both left: 105 <= 110 and 110 <= 120 - 10
    assert window.recent(120.0) == 1
    assert window.recent(130.0) == 0


def test_the_default_restart_window_and_its_limits():
    window = RestartWindow()
    assert (window.limit, window.window_s) == (MAX_RESTARTS, RESTART_WINDOW_S) == (5, 60.0)
    assert all(window.allow(0.0) for _ in range(5))
    assert not window.allow(59.0)
    assert window.allow(60.0)
    assert not RestartWindow(limit=0).allow(0.0)  # no restart at all
    with pytest.raises(ValueError):
        RestartWindow(window_s=0)


def test_a_child_that_leaves_a_pass_unanswered_is_killed_and_its_passes_lost(
    model_file, monkeypatch
):
    monkeypatch.setenv(HANG_WORD_ENV, "and")
    proc = ModelProcess(model_file, "fp32", threads=1, pass_timeout_s=1.0)
    try:
        tagger = Tagger.from_file(model_file, OPTIONS)
        expected = tagger.tag(["Peter went to Paris ."])
        tagger.use_runner(proc)
        assert tagger.tag(["Peter went to Paris ."]) == expected
        hung_pid = proc.pid
        marked = pad_batch([tagger.vocabs.encode(["Peter", "and"])], pad_to=8)
        hung, behind = proc([marked], [1]), proc([marked], [1])
        assert not hung.ready()  # not yet overdue
        # The blocking wait ends at the timeout, not never: the child is killed, both passes lost.
        with pytest.raises(ModelProcessError, match=r"did not answer a pass in 1 s"):
            hung.get()
        with pytest.raises(ModelProcessError, match="hung"):
            behind.get()
        assert proc._process.poll() is not None, "the hung child was not stopped"
        proc.restart()
        assert proc.pid != hung_pid
        assert tagger.tag(["Peter went to Paris ."]) == expected
        # Found overdue by the non-blocking check too, as the tagging thread polls.
        late = proc([marked], [1])
        wait_for(late.ready, timeout=10, what="the overdue pass to settle")
        with pytest.raises(ModelProcessError, match="hung"):
            late.get()
    finally:
        proc.close()
