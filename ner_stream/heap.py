"""The Python heap of a process that tags: fewer and cheaper cycle collections.

Tagging allocates several container objects per token (tokens, windows, encoded ids, passes,
entities), and nearly all of them die by reference counting within one micro-batch: they are never
garbage for the cycle collector. CPython's default young-generation threshold (700 net allocations)
still ran a young collection every few documents, each of which promoted the documents waiting in
the queues at that moment to the older generations, so that full collections came every second or
so and walked every object created since start-up (queued documents, the encoding cache, the Kafka
clients' state). In the worker's process that was about a sixth of the time its threads held the
GIL at saturation; `docs/benchmarks.md` ("Ninth round") has the figures.

`settle` is called once, when start-up is over: the start-up heap (vocabularies, torch, the
libraries) is frozen, moved to the permanent generation that collections skip (it stays alive
anyway), and the young generation collects after `YOUNG_THRESHOLD` net allocations. Reference
cycles are still collected, later.
"""

from __future__ import annotations

import gc

# Net allocations of tracked objects between young collections (CPython's default: 700), and
# how many collections of a generation make one of the next (defaults 10 and 10).
YOUNG_THRESHOLD = 50_000
OLDER_THRESHOLDS = (20, 100)


def settle() -> None:
    """Collect what start-up left as garbage, freeze the rest (`gc.freeze`) and raise the
    collection thresholds to `YOUNG_THRESHOLD` and `OLDER_THRESHOLDS`.

    For the process's entry point only, once its long-lived objects exist: it changes the
    collector's settings for the whole process.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
