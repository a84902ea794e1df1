"""The network and CRF decoding in a child process, for a worker whose model runs on the CPU.

Why a process: the worker's consuming side (polling, JSON, tokenizing, kafka-python's I/O
threads) is pure Python and holds the GIL most of the time. In one process the tagging thread
has to win the GIL back after every torch and numpy call of the forward pass and the CRF, and
the two stages together use well under two cores. A child process has its own interpreter: the
model never waits for the parent's Python, and the parent's Python runs beside it on another
core.

The child holds a `LocalRunner` built from the model file; the parent still tokenizes, encodes,
pads and turns tags into entities; only padded arrays (about 1.5 MB
for a full micro-batch) and the tags and confidences of the real rows cross the pipe. In the
child, passes flow through two stages on two threads, the network (torch, `--torch-threads`
threads) and then the CRF, so that one pass is decoded while the next one's network runs.

A child that dies (killed for memory, a native crash) loses the passes it had: their replies raise
`ModelProcessError`, and `ModelProcess.restart` starts a fresh child in its place. A child that
hangs (a deadlock, a pass that never ends) is treated the same way: when the oldest pass it holds
has not been answered within `pass_timeout_s`, the child is killed and its passes are lost. How
often that may happen is `RestartWindow`'s decision; what becomes of the lost documents is the
tagging stage's (`ner_stream.tagging`).

Testing hooks: when the environment variable named by `CRASH_WORD_ENV` is set in the child's
environment, the child kills itself (SIGKILL, as the kernel's OOM killer would) on any pass that
contains that word, looked up as the model's vocabulary looks words up; with `HANG_WORD_ENV`, it
stops answering (sleeps) on such a pass instead. It lets the tests make a
marked document kill the model; unset, nothing changes. A word the vocabulary does not know is
refused at start, so that a misspelt hook cannot pass a test by never firing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from ner_stream import heap
from ner_stream.checkpoint import load
from ner_stream.model import Batch
from ner_stream.runner import Forwarded, LocalRunner, PendingPass, Runner, RunnerDied
from ner_stream.vocab import Vocabularies, word_key

# Testing hook (see the module docstring): read by the child only.
CRASH_WORD_ENV = "NER_STREAM_TEST_CRASH_WORD"
HANG_WORD_ENV = "NER_STREAM_TEST_HANG_WORD"
PROC_FD = "/proc/self/fd"  # where a process finds its open files by descriptor (Linux)
DEFAULT_PASS_TIMEOUT_S = 60.0

# A worker gives up when the model process dies more often than this: a model that dies on
# (nearly) every pass would otherwise be restarted forever, one document at a time.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class ModelProcessError(RunnerDied):
    """The model process cannot serve: it failed to start, or it died.

    Unlike an error in one pass, a death says nothing yet about the documents of the passes it
    took: the tagging stage restarts the model and tries them again (see `ner_stream.tagging`).
    """


class RestartWindow:
    """Whether the model process may be started again: at most `limit` restarts in `window_s`.

    Pure: the caller passes the time (seconds of a monotonic clock) of each restart it wants.
    """

    def __init__(self, limit: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S) -> None:
        if limit < 0 or window_s <= 0:
            raise ValueError("need limit >= 0 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()  # restarts in the window, oldest first

    def allow(self, now: float) -> bool:
        """Record a restart at `now` and return True, or return False: one too many.

        A restart is one too many when `limit` restarts already happened in the `window_s`
        seconds up to `now`; a refused restart is not recorded.
        """
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True

    def recent(self, now: float) -> int:
        """Restarts recorded in the `window_s` seconds up to `now`."""
        return sum(1 for t in self._times if t > now - self.window_s)


class ModelProcess:
    """A child process holding the model; calling it runs the passes there (a `Runner`, see
    `ner_stream.runner`, for `Tagger.use_runner`).

    The child runs the network on the CPU at `precision` (the one the parent's `Tagger` chose),
    with `threads` torch threads. A child that leaves its oldest pass unanswered for
    `pass_timeout_s` seconds counts as hung: it is killed, and its passes are lost as with a
    death. `restart` replaces a child that died, `close` stops the child.

    With `private_copy`, the children load a copy of the model file made at the first start
    (see `_copy`: on Linux an unlinked file, gone with this process), so that a restart brings
    back this model whatever the file holds by then: the worker takes up new models from a
    `--model` file while it runs (`ner_stream.model_swap`), and one refused there must not
    reach a restart.

    With `wait` (the default) the constructor returns once the child has loaded the model;
    without it, at once, and `started` says when the child is ready (a short command such as
    `ner-stream tag` tags in its own process meanwhile: `LocalUntilStarted`).
    """

    def __init__(
        self,
        model_path: str | Path,
        precision: str,
        threads: int,
        start_timeout_s: float = 120.0,
        pass_timeout_s: float = DEFAULT_PASS_TIMEOUT_S,
        private_copy: bool = False,
        wait: bool = True,
    ) -> None:
        self._spec = {"model": str(model_path), "precision": precision, "threads": threads}
        self._copy_dir: str | None = None
        self._copy_fd: int | None = None
        if private_copy:
            self._spec["model"] = self._copy(Path(model_path))
        self._start_timeout_s = start_timeout_s
        self._pass_timeout_s = pass_timeout_s
        # When the oldest waiting pass became the oldest: the child has had its whole attention
        # for it since then (the passes behind it wait their turn).
        self._oldest_since = 0.0
        self._lock = threading.Lock()
        self._waiting: deque[Reply] = deque()
        self._digest: str | None = None  # of the model file the first child loaded
        self._ready = False  # the current child has loaded the model
        try:
            self._launch()
            if wait:
                self.started(wait=True)
        except BaseException:
            self._remove_copy()
            raise

    def _copy(self, path: Path) -> str:
        """Copy the model file for the children; the path under which they read the copy.

        On Linux the copy is a temporary file unlinked at once and held open by this process,
        read through ``/proc/self/fd/N`` (the children inherit descriptor N): nothing is left on
        disk however the worker ends, `kill -9` included. Elsewhere it lies in a private
        temporary folder that `close` removes.
        """
        try:
            if Path(PROC_FD).is_dir():
                fd, name = tempfile.mkstemp(prefix="ner-stream-model-", suffix=path.suffix)
                self._copy_fd = fd
                os.unlink(name)
                with open(path, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                return f"{PROC_FD}/{fd}"
            self._copy_dir = tempfile.mkdtemp(prefix="ner-stream-model-")
            copy = Path(self._copy_dir) / path.name
            shutil.copyfile(path, copy)
            return str(copy)
        except OSError as e:
            self._remove_copy()
            raise ModelProcessError(f"the model process could not load the model: {e}") from None

    def _remove_copy(self) -> None:
        if self._copy_fd is not None:
            os.close(self._copy_fd)
            self._copy_fd = None
        if self._copy_dir is not None:
            shutil.rmtree(self._copy_dir, ignore_errors=True)
            self._copy_dir = None

    @property
    def digest(self) -> str | None:
        """The sha256 (hex) of the model file the children load."""
        return self._digest

    def _start(self) -> None:
        """Start a child and wait until it has loaded the model; ModelProcessError if it cannot."""
        self._launch()
        self.started(wait=True)

    def _launch(self) -> None:
        """Start a child (not waiting for it); ModelProcessError if the model file cannot be read
        or is no longer the one the first child loaded."""
        try:
            with open(self._spec["model"], "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise ModelProcessError(f"the model process could not load the model: {e}") from None
        if self._digest is not None and digest != self._digest:
            # The parent encodes with the vocabularies of the model it loaded at start: a child
            # with another model would tag garbage.
            raise ModelProcessError(
                f"the model file {self._spec['model']} changed since the worker started; "
                "a restarted worker serves the new one"
            )
        # A fresh interpreter (`python -m`), not a fork: a fork of a process that already runs
        # torch and Kafka client threads could inherit locks those threads hold, and
        # multiprocessing's "spawn" would import the caller's main module again.
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), json.dumps(self._spec)],
                pass_fds=[theirs.fileno()] + ([self._copy_fd] if self._copy_fd is not None else []),
            )
        self._conn = Connection(ours.detach())
        self._ready = False
        self._launched = (time.monotonic(), digest)

    def started(self, wait: bool = False) -> bool:
        """Whether the child has loaded the model and takes passes; `wait`: wait for that, up to
        the start timeout.

        Raises `ModelProcessError` when the child cannot start: it exited, could not load the
        model, or was not ready within the start timeout. This object is then closed.
        """
        if self._ready:
            return True
        launched_at, digest = self._launched
        left = launched_at + self._start_timeout_s - time.monotonic()
        try:
            arrived = self._conn.poll(max(0.0, left) if wait else 0)
        except OSError:  # closed: this start already failed, or `close` came first
            raise ModelProcessError(self._stopped_message()) from None
        if not arrived:
            if not wait and left > 0:
                return False
            self.close()
            limit = self._start_timeout_s
            raise ModelProcessError(f"the model process did not start in {limit:g} s")
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise ModelProcessError(self._stopped_message()) from None
        if reply[0] != "ready":
            self.close()
            raise ModelProcessError(f"the model process could not load the model: {reply[1]}")
        self._digest = digest
        self._ready = True
        return True

    @property
    def pid(self) -> int:
        """The process id of the current child (a restart changes it)."""
        return self._process.pid

    def __call__(self, batches: list[Batch], rows: list[int]) -> Reply:
        """Send passes (see `Runner`) to the child; its reply comes later.

        Passes are answered in the order they were sent, so the caller can send the next one
        before collecting this one and the child never waits for the caller. Waits for a child
        that is still starting (see `started`, whose errors it raises).
        """
        self.started(wait=True)
        payload = [
            (b.words.numpy(), b.chars.numpy(), b.cases.numpy(), b.mask.numpy()) for b in batches
        ]
        reply = Reply(self)
        with self._lock:
            try:
                self._conn.send((payload, rows))
            except OSError:
                raise ModelProcessError(self._stopped_message()) from None
            if not self._waiting:
                self._oldest_since = time.monotonic()
            self._waiting.append(reply)
        return reply

    def _receive(self, block: bool) -> bool:
        """Take the next answer off the pipe for the oldest waiting reply; False if none came.

        When the child is gone, or has left the oldest reply unanswered for the pass timeout (it
        is then killed), every waiting reply is answered as lost (see `Reply.get`). `block`
        waits at most until that timeout.
        """
        with self._lock:
            if not self._waiting:
                return False
            try:
                left = self._oldest_since + self._pass_timeout_s - time.monotonic()
                if not self._conn.poll(max(0.0, left) if block else 0):
                    if not block and left > 0:
                        return False
                    self._kill_hung()
                    return True
                message = self._conn.recv()
            except (EOFError, OSError):
                self._lose_waiting(self._stopped_message())
                return True
            self._waiting.popleft().message = message
            self._oldest_since = time.monotonic()
            return True

    def _kill_hung(self) -> None:
        """Kill a child that did not answer in time (the lock held); its passes are lost."""
        with contextlib.suppress(OSError):
            self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(5.0)
        self._lose_waiting(
            f"the model process did not answer a pass in {self._pass_timeout_s:g} s "
            "and was stopped (hung)"
        )

    def _lose_waiting(self, why: str) -> None:
        """Answer every waiting reply as lost (the lock held): its child will never answer."""
        while self._waiting:
            self._waiting.popleft().message = ("lost", why)

    def restart(self) -> None:
        """Replace the child (one that died) with a fresh one, with the same model and options.

        Replies still waiting for the old child raise `ModelProcessError`. Raises
        `ModelProcessError` itself if the new child cannot start (the model file became
        unreadable, say) or the model file is no longer the one the first child loaded: this
        object is then closed.
        """
        with self._lock:
            self._lose_waiting("the model process was restarted before it answered")
        self._stop(5.0)
        self._start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the child: asked first, terminated if it does not exit in `timeout_s`. Removes the
        private copy of the model file, if any."""
        try:
            self._stop(timeout_s)
        finally:
            self._remove_copy()

    def _stop(self, timeout_s: float) -> None:
        if not self._ready:
            # Still loading, or failed to: nothing of it to wait for (a `tag` of one line would
            # otherwise wait out the child's start-up).
            with contextlib.suppress(OSError):
                self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout_s)
            self._conn.close()
            return
        # A tagging thread left blocked on a reply (a shutdown that timed out) holds the lock:
        # the child is then terminated without being asked.
        if self._lock.acquire(timeout=1.0):
            try:
                with contextlib.suppress(OSError):  # already gone
                    self._conn.send(None)
            finally:
                self._lock.release()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.terminate()
            self._process.wait(timeout_s)
        self._conn.close()

    def _stopped_message(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(1.0)
        return f"the model process stopped (exit code {self._process.returncode})"


class LocalUntilStarted:
    """A `Runner` for a short command (`ner-stream tag`): passes run in this process (`local`)
    while the model process `process` (made with ``wait=False``) starts beside it, and in the
    model process once it is ready, so that a small input does not wait for a second
    interpreter to import torch and load the model.

    Raises `ModelProcessError` (from `ModelProcess.started`) when the model process cannot start.
    """

    def __init__(self, local: Runner, process: ModelProcess) -> None:
        self.local = local
        self.process = process

    def __call__(self, batches: list[Batch], rows: list[int]) -> PendingPass:
        """Run the passes (see `Runner`) here, or in the model process once it has started."""
        if self.process.started():
            return self.process(batches, rows)
        return self.local(batches, rows)


class Reply:
    """The model process's answer to one forward pass, once it has come."""

    def __init__(self, process: ModelProcess) -> None:
        self._process = process
        self.message: tuple | None = None

    def ready(self) -> bool:
        """Whether the answer has come (or the child is gone): `get` then does not wait."""
        while self.message is None:
            if not self._process._receive(block=False):
                return False
        return True

    def get(self) -> Forwarded:
        """The tags and confidences; raises if the child could not run the pass.

        `ModelProcessError` when the child died before it answered; RuntimeError when it
        answered that this pass failed.
        """
        while self.message is None:
            self._process._receive(block=True)
        if self.message[0] == "lost":
            raise ModelProcessError(self.message[1])
        if self.message[0] != "ok":
            raise RuntimeError(f"the model process failed on a pass: {self.message[1]}")
        _, tags, scores, seconds = self.message
        return Forwarded(tags, scores, seconds)


def serve(conn: Connection, model_path: str, precision: str, threads: int) -> None:
    """The child's loop: load the model, then answer passes until told to stop or orphaned."""
    # Ctrl-C reaches the whole process group; the parent decides when the model stops, after
    # the batches in flight are done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        loaded = load(model_path)
        runner = LocalRunner(loaded.model, torch.device("cpu"), precision)
        crash_id = _hook_word_id(loaded.info.vocabs, CRASH_WORD_ENV)
        hang_id = _hook_word_id(loaded.info.vocabs, HANG_WORD_ENV)
    except Exception as e:  # reported to the parent, which fails with the message
        conn.send(("error", str(e)))
        return
    heap.settle()
    # Requests are read as they come, on a thread of their own: the parent may be sending the
    # next pass (more than a socket buffer holds) while this loop sends the answer to the last
    # one, and neither side may block the other.
    requests: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_requests, args=(conn, requests), daemon=True).start()
    # The network of one pass runs while the CRF decodes the pass before it, on a thread of its
    # own: the CRF is about a sixth of a pass, and a CPU rarely has no room at all for
    # it beside the worker's own process. The two threads hand the GIL back and forth, so it
    # must be handed over promptly.
    sys.setswitchinterval(0.0005)
    decoded: queue.SimpleQueue = queue.SimpleQueue()
    decoder = threading.Thread(target=_decode_and_reply, args=(conn, runner, decoded))
    decoder.start()
    try:
        try:
            conn.send(("ready", os.getpid()))
        except OSError:  # the parent is gone (it died or gave up while this one loaded)
            return
        while True:
            message = requests.get()
            if message is None:  # asked to stop, or the parent is gone
                return
            arrays, rows = message
            # fields[0] of each pass: its word ids.
            if crash_id is not None and any((fields[0] == crash_id).any() for fields in arrays):
                os.kill(os.getpid(), signal.SIGKILL)  # the testing hook: die as an OOM kill does
            if hang_id is not None and any((fields[0] == hang_id).any() for fields in arrays):
                time.sleep(3600)  # the testing hook: never answer, as a deadlocked pass would
            t0 = time.perf_counter()
            try:
                batches = [Batch(*(torch.from_numpy(a) for a in fields)) for fields in arrays]
                decoded.put((runner.run_network(batches, rows), time.perf_counter() - t0))
            except Exception as e:  # this pass's documents fail; the next pass may be fine
                decoded.put(("error", f"{type(e).__name__}: {e}"))
    finally:
        decoded.put(None)
        decoder.join()  # the answers to passes already run still go out


def _hook_word_id(vocabs: Vocabularies, env: str) -> int | None:
    """The word id of a testing hook's word (see the module docstring), None when unset."""
    word = os.environ.get(env)
    if not word:
        return None
    key = word_key(word, vocabs.lowercase)
    if key not in vocabs.words:
        raise ValueError(f"{env}={word!r} is not in the model's vocabulary")
    return vocabs.words.stoi[key]


def _decode_and_reply(conn: Connection, runner: LocalRunner, decoded: queue.SimpleQueue) -> None:
    """Decode each pass's emissions, in order, and send the answer."""
    while True:
        item = decoded.get()
        if item is None:
            return
        if item[0] == "error":
            reply: tuple = item
        else:
            emissions, network_s = item
            t0 = time.perf_counter()
            try:
                tags, scores = runner.decode(emissions)
                reply = ("ok", tags, scores, network_s + time.perf_counter() - t0)
            except Exception as e:  # as in the network: this pass alone fails
                reply = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except OSError:  # the parent is gone; the reading thread ends the loop
            return


def _read_requests(conn: Connection, requests: queue.SimpleQueue) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            message = None
        requests.put(message)
        if message is None:
            return


def main(argv: list[str]) -> None:
    """Entry point of the child: `python -m ner_stream.model_process FD SPEC_JSON`."""
    fd, spec = int(argv[0]), json.loads(argv[1])
    serve(Connection(fd), spec["model"], spec["precision"], spec["threads"])


if __name__ == "__main__":
    main(sys.argv[1:])
