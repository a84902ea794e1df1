"""Hot model swap: a new `--model` file taken up by a running worker, without a restart.

Three parts, each in its own place:

- `ChangeDetector` (pure, the clock passed in) decides when the file is worth loading: on a poll
  every `--model-watch-s` seconds, a new signature (mtime, size, inode) counts only once a further
  poll sees it unchanged, so that a file still being written is not loaded; SIGHUP asks for a
  look now.
- `ModelSwapper` is the watcher thread around it. It loads a changed file in the background and
  checks it (`refusal`, then a smoke tag through the candidate's own runner: a new model process
  on the CPU). A candidate that passes waits for the tagging thread; one that fails leaves the
  running model in place, with one log line and `ner_stream_model_swaps_total{result="refused"}`.
- The swap itself happens in the tagging thread, between micro-batches
  (`tagging.TaggingStage._swap_model`): no document's entities mix two models.

The worker watches only a `--model` file; the packaged model is never swapped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ner_stream.checkpoint import CheckpointError, ModelInfo, load
from ner_stream.model_process import ModelProcess
from ner_stream.spans import OUTSIDE, entity_types, split_tag
from ner_stream.tagger import Tagger

if TYPE_CHECKING:
    from ner_stream.metrics import Metrics

log = logging.getLogger(__name__)

# Tagged by every candidate before it may serve: a model that cannot tag this serves nothing.
SMOKE_TEXT = "Peter Smith went from Paris to Berlin with Acme Corp ."
# How long closing the swapper waits for a candidate being loaded and checked.
CLOSE_WAIT_S = 5.0
# Longest reason in a refusal's log line: a library's error can run to paragraphs.
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class Signature:
    """What a poll sees of a file without reading it; a new one means the file was written or
    replaced."""

    mtime_ns: int
    size: int  # bytes
    inode: int


def signature_of(path: str | os.PathLike[str]) -> Signature | None:
    """The signature of the file at `path`; None when it cannot be seen (missing, no access)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Signature(st.st_mtime_ns, st.st_size, st.st_ino)


class ChangeDetector:
    """When a watched file is to be loaded: pure, the caller passes each poll's signature and the
    time (seconds of a monotonic clock).

    `current` is the signature last acted on (at first, that of the file the running model came
    from). A poll that sees another signature remembers it; the file is loaded when the next poll
    sees that same signature again, unchanged for a whole interval. A missing file loads nothing.
    `check_now` (SIGHUP) loads the file as it is, whatever its signature. `interval_s` 0: no
    polling, only `check_now`.
    """

    def __init__(self, current: Signature | None, interval_s: float, now: float) -> None:
        if interval_s < 0:
            raise ValueError("interval_s must not be negative")
        self.current = current
        self.interval_s = interval_s
        self._seen: Signature | None = None  # a new signature waiting for a second look
        self._last_poll = now

    def wait_s(self, now: float) -> float | None:
        """Seconds until the next poll is due (0: now); None when there is no polling."""
        if not self.interval_s:
            return None
        return max(0.0, self._last_poll + self.interval_s - now)

    def poll(self, seen: Signature | None, now: float) -> bool:
        """Record a poll at `now` that found `seen` (None: no file); True: load the file now."""
        self._last_poll = now
        if seen is None or seen == self.current:
            self._seen = None
            return False
        if seen != self._seen:
            self._seen = seen  # new, or still changing: wait for the next poll
            return False
        self.current, self._seen = seen, None
        return True

    def check_now(self, seen: Signature | None, now: float) -> bool:
        """A request to look at the file now (SIGHUP); True: load it (unless it is missing)."""
        self._last_poll = now
        self._seen = None
        if seen is None:
            return False
        self.current = seen
        return True


@dataclass(frozen=True)
class Served:
    """What a candidate is compared with: the model that serves, or will once swapped in."""

    name: str
    version: str
    digest: str  # sha256 of its file, hex
    types: frozenset[str]  # entity types


def served_by(info: ModelInfo, digest: str) -> Served:
    """The `Served` of a model already loaded; its entity types read leniently (it serves)."""
    types = {split_tag(t)[1] for t in info.vocabs.tags.itos if t != OUTSIDE}
    return Served(info.name, info.version, digest, frozenset(types))


def refusal(info: ModelInfo, digest: str, serving: Served) -> str | None:
    """Why a loaded model file (`info`, `digest` its sha256) may not replace `serving`, in a few
    words; None when it may.

    Refused: a tag set that is not well formed in its scheme (`spans.entity_types`), entity types
    other than those served (downstream consumers expect them: other types need a redeploy), and
    the name and version of the model served with other content (outputs must name the model
    that produced them). A file with the same content as `serving` is not a candidate at all:
    the caller skips it before.
    """
    try:
        types = entity_types(info.vocabs.tags.itos, info.config.tag_scheme)
    except ValueError as e:
        return f"its tag set is not usable: {e}"
    if types != serving.types:
        return (
            f"its entity types ({', '.join(sorted(types))}) are not those served "
            f"({', '.join(sorted(serving.types))}); other types need a redeploy"
        )
    if (info.name, info.version) == (serving.name, serving.version) and digest != serving.digest:
        return (
            f"it is named {info.name} {info.version} like the model served but its content "
            "differs; give it a new version"
        )
    return None


class Refused(Exception):
    """A candidate that may not serve; the message says why."""


@dataclass(eq=False)
class Candidate:
    """A checked model, ready to be swapped in: its tagger (with its runner), the restart of its
    model process (None: it runs in this process), and what it serves."""

    tagger: Tagger
    restart: Callable[[], None] | None
    served: Served
    source: Path  # the watched file it was read from
    _close: Callable[[], None] | None = None

    def close(self) -> None:
        """Stop its model process, if any; idempotent."""
        close, self._close = self._close, None
        if close is not None:
            close()


# Starts the runner of a candidate's tagger (`Tagger.use_runner`) from the watched file: returns
# its model process, which loads a private copy of the file (`ModelProcess(private_copy=True)`),
# or None when the model runs in this process. Raises `ModelProcessError`.
StartRunner = Callable[[Tagger], ModelProcess | None]


class ModelSwapper:
    """Watches the model file `path` of the running `tagger`, and loads, checks and hands over
    each new model in it (see the module docstring).

    The tagging thread `take`s a waiting candidate, swaps it in and reports it `served`, which
    closes the model it replaced (`retire`: what closes the first model's process). `check_now`
    is SIGHUP's; `start` and `close` bound the watcher thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tagger: Tagger,
        metrics: Metrics,
        start_runner: StartRunner,
        interval_s: float,
        retire: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._options = tagger.options
        self._metrics = metrics
        self._start_runner = start_runner
        self._clock = clock
        # The signature before the content: a change in between is seen at the next poll.
        self._detector = ChangeDetector(signature_of(self.path), interval_s, clock())
        try:
            digest = _digest(self.path.read_bytes())
        except OSError:  # gone since it was loaded: any file that appears there is new
            digest = ""
        self._latest = served_by(tagger.info, digest)
        self._lock = threading.Lock()
        self._waiting: Candidate | None = None
        self._serving_close = retire
        self._closed = False
        self._look_now = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="model-watch", daemon=True)

    def start(self) -> ModelSwapper:
        """Start watching."""
        self._thread.start()
        return self

    def check_now(self) -> None:
        """Look at the file now, whatever its signature (SIGHUP); safe in a signal handler."""
        self._look_now = True
        self._wake.set()

    def take(self) -> Candidate | None:
        """The checked candidate waiting to be swapped in, if any (the tagging thread's call)."""
        with self._lock:
            candidate, self._waiting = self._waiting, None
            return candidate

    def served(self, candidate: Candidate) -> None:
        """`candidate` now serves: close the model it replaced."""
        with self._lock:
            old, self._serving_close = self._serving_close, candidate.close
        if old is not None:
            old()

    def close(self) -> None:
        """Stop watching; close a waiting candidate and the model serving (at shutdown)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, None
            serving, self._serving_close = self._serving_close, None
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(CLOSE_WAIT_S)
        for close in (waiting.close if waiting else None, serving):
            if close is not None:
                close()

    # ------------------------------------------------------------------ the watcher thread

    def _watch(self) -> None:
        while not self._closed:
            self._wake.wait(self._detector.wait_s(self._clock()))
            self._wake.clear()
            if self._closed:
                return
            look_now, self._look_now = self._look_now, False
            self.look(look_now)

    def look(self, now_asked: bool = False) -> None:
        """One look at the file, in the caller's thread: what the watcher thread does at each
        poll, and with `now_asked` on SIGHUP. A file the `ChangeDetector` finds ready is loaded,
        checked and handed over, or refused (logged and counted). Never raises."""
        seen, now = signature_of(self.path), self._clock()
        look = self._detector.check_now if now_asked else self._detector.poll
        if look(seen, now) and seen is not None:
            self._consider(seen)

    def _consider(self, seen: Signature) -> None:
        """Load and check the file as `seen`; hand it over, or log and count its refusal. Never
        raises: nothing in a model file may stop the worker."""
        try:
            candidate = self._load(seen)
        except Refused as e:
            self._refuse(str(e))
            return
        except Exception as e:
            log.debug("loading %s failed", self.path, exc_info=True)
            self._refuse(f"{type(e).__name__}: {e}")
            return
        if candidate is None:
            return
        with self._lock:
            closed = self._closed
            if not closed:
                replaced, self._waiting = self._waiting, candidate
                self._latest = candidate.served
        if closed:
            candidate.close()
            return
        if replaced is not None:
            log.info("model %s %s was replaced before it was swapped in",
                     replaced.tagger.name, replaced.tagger.version)  # fmt: skip
            replaced.close()
        log.debug("model %s %s from %s passed its checks; it is swapped in between micro-batches",
                  candidate.tagger.name, candidate.tagger.version, self.path)  # fmt: skip

    def _refuse(self, reason: str) -> None:
        reason = " ".join(reason.split())  # one line, whatever the error said
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        latest = self._latest
        log.warning("model swap refused: %s: %s; still serving %s %s",
                    self.path, reason, latest.name, latest.version)  # fmt: skip
        self._metrics.swaps["refused"].inc()

    def _load(self, seen: Signature) -> Candidate | None:
        """The checked candidate in the file, None when there is none to swap in (the content is
        the one served, or the file changed while it was read: the next poll looks again).

        Raises `Refused`, or whatever else loading or tagging raised.
        """
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise Refused(f"cannot read it: {e.strerror or e}") from None
        digest = _digest(data)
        if digest == self._latest.digest:
            log.debug("model file %s has the content already served: nothing to swap", self.path)
            return None
        try:
            loaded, error = load(self.path), None
        except CheckpointError as e:
            loaded, error = None, e
        if signature_of(self.path) != seen:
            # Still being written, or replaced again: what was read is not what is there.
            log.info("model file %s changed while it was read: not swapped; the next poll "
                     "(or SIGHUP) looks again", self.path)  # fmt: skip
            return None
        if loaded is None:
            # The log line names the file already.
            raise Refused(str(error).replace(f"{self.path} ", "it ", 1))
        why = refusal(loaded.info, digest, self._latest)
        if why:
            raise Refused(why)
        try:
            tagger = Tagger(loaded, self._options)
        except ValueError as e:  # the precision asked for does not suit this model
            raise Refused(str(e)) from None
        process = self._start_runner(tagger)
        try:
            if process is not None and process.digest != digest:
                # It copied the file after a new write: not the model checked here.
                log.info("model file %s changed while it was read: not swapped; the next poll "
                         "(or SIGHUP) looks again", self.path)  # fmt: skip
                process.close()
                return None
            _smoke_test(tagger)
        except BaseException:
            if process is not None:
                process.close()
            raise
        # `refusal` let it through: its entity types are those served.
        served = Served(loaded.info.name, loaded.info.version, digest, self._latest.types)
        if process is None:
            return Candidate(tagger, None, served, self.path)
        return Candidate(tagger, process.restart, served, self.path, process.close)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _smoke_test(tagger: Tagger) -> None:
    """Tag `SMOKE_TEXT` through the tagger's runner; `Refused` when the result is unusable.
    Raises what tagging raises (a model process that cannot run the model)."""
    (entities,) = tagger.tag([SMOKE_TEXT])
    for e in entities:
        if not 0.0 <= e.score <= 1.0 or SMOKE_TEXT[e.start : e.end] != e.text:
            raise Refused(f"a smoke test tagged an impossible entity {e}")
