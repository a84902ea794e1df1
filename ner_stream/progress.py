"""How far `ner-stream tag` is through its input files: documents, tokens/s and time left.

Pure: the caller passes the clock's readings and decides where the line goes (stderr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def format_duration(seconds: float) -> str:
    """Seconds as "45s", "3m05s" or "2h07m" (rounded down to the unit shown)."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class TagProgress:
    """The progress line of one `tag` run.

    `total_bytes` is the size of the input files (None when unknown, as for stdin: no
    percentage and no ETA then); `started` is the clock's reading (seconds) when reading began.
    The ETA assumes the bytes still to read go at the average rate so far.
    """

    total_bytes: int | None
    started: float
    interval_s: float = 0.5  # the least time between two lines shown
    documents: int = 0
    tokens: int = 0
    done_bytes: int = 0
    _shown: float = -math.inf

    def advance(self, documents: int, tokens: int, done_bytes: int, now: float) -> str | None:
        """Count `documents` more documents of `tokens` tokens, the input read up to byte
        `done_bytes`; the line to show when `interval_s` has passed since the last one, else
        None."""
        self.documents += documents
        self.tokens += tokens
        self.done_bytes = done_bytes
        if now - self._shown < self.interval_s:
            return None
        self._shown = now
        return self.line(now)

    def line(self, now: float) -> str:
        """`12,800 documents  41,230 tokens/s  37%  ETA 1m12s` as of `now`."""
        elapsed = max(now - self.started, 1e-9)
        parts = [f"{self.documents:,} documents", f"{self.tokens / elapsed:,.0f} tokens/s"]
        if self.total_bytes:
            done = min(self.done_bytes / self.total_bytes, 1.0)
            parts.append(f"{100 * done:.0f}%")
            if 0 < done < 1:
                parts.append(f"ETA {format_duration(elapsed * (1 - done) / done)}")
        return "  ".join(parts)
