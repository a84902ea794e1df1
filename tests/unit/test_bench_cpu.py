"""The CPU accounting of the open-loop latency runs (benchmarks/bench_e2e.py) and its column."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks import run_all
from benchmarks.bench_e2e import (
    CpuShare,
    descendants,
    lower_priority,
    machine_busy_s,
    process_cpu_s,
)


def _spin(n: int = 3_000_000) -> int:
    return sum(i * i for i in range(n))


def test_a_process_and_the_machine_are_seen_using_cpu():
    own, busy = process_cpu_s(os.getpid()), machine_busy_s()
    _spin()
    assert process_cpu_s(os.getpid()) > own
    assert machine_busy_s() > busy
    assert process_cpu_s(2**22 + 7) == 0.0  # no such process


def test_the_worker_share_counts_its_model_process_and_not_the_load_generator():
    # A "worker" whose child does the work, as the model process does.
    spin = "while True: pass"
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        deadline = time.monotonic() + 30
        while not descendants(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        share = CpuShare(parent.pid)
        time.sleep(1.0)
        cores = share.cores()
    finally:
        for pid in descendants(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert cores["worker"] > 0.2, cores  # the child's spinning, on however busy a machine
    assert cores["load_generator"] < 0.2, cores  # this process only slept
    assert cores["machine"] >= cores["worker"] * 0.8, cores


def test_the_cores_column_reads_all_generator_worker():
    assert run_all.cores({"machine": 1.9, "load_generator": 0.31, "worker": 1.234}) == (
        "1.90 / 0.31 / 1.23"
    )
    assert run_all.cores(None) == "n/a"  # results from before the column


def _niceness(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_the_load_generator_runs_niced_and_its_producer_threads_inherit_it():
    """The generator's thread, and threads it starts (kafka-python's I/O thread), give way to the
    worker and the broker; the benchmark's other threads keep their priority."""
    seen: dict[str, int] = {}

    def job() -> None:
        seen["generator"] = _niceness(threading.get_native_id())
        started = threading.Thread(
            target=lambda: seen.setdefault("io", _niceness(threading.get_native_id()))
        )
        started.start()
        started.join()

    base = _niceness(threading.get_native_id())
    with ThreadPoolExecutor(1, initializer=lower_priority, initargs=(7,)) as pool:
        pool.submit(job).result()
    assert seen == {"generator": min(base + 7, 19), "io": min(base + 7, 19)}
    assert _niceness(threading.get_native_id()) == base
    with ThreadPoolExecutor(1, initializer=lower_priority, initargs=(0,)) as pool:
        pool.submit(job).result()
    assert seen["generator"] == base  # 0: as before


def test_the_model_busy_column_is_offered_rate_times_inference_per_document():
    run = {
        "offered_docs_per_s": 400.0,
        "batches": {"mean_docs_per_micro_batch": 80.0, "mean_inference_s_per_micro_batch": 0.18},
    }
    assert abs(run_all.model_busy(run) - 0.9) < 1e-9  # 400 docs/s x 2.25 ms
    run["batches"]["mean_docs_per_micro_batch"] = None  # no micro-batch in the run
    assert run_all.model_busy(run) is None
