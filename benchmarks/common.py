"""Helpers shared by the benchmarks: machine description, timing statistics, JSON output.

Standard library only: the spaCy benchmark runs in its own virtual environment.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(__file__).resolve().parent / ".out"


def env_flag(name: str) -> bool:
    """True when the environment variable is set to something other than '', 0, false, no."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def quick_mode(flag: bool = False) -> bool:
    """Smoke-run sizes: `--quick` or BENCH_QUICK=1."""
    return flag or env_flag("BENCH_QUICK")


def cpu_info() -> dict:
    """CPU model, core counts and the flags that matter for bf16 and wide vectors."""
    info: dict = {"logical_cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info["usable_cpus"] = usable
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        fields = dict(
            (k.strip(), v.strip())
            for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
        )
        for key in (
            "Model name",
            "Vendor ID",
            "CPU family",
            "Model",
            "Thread(s) per core",
            "Core(s) per socket",
            "Socket(s)",
            "L2 cache",
            "L3 cache",
            "Hypervisor vendor",
        ):
            if key in fields:
                info[key.lower().replace(" ", "_").replace("(s)", "s")] = fields[key]
    except (OSError, subprocess.SubprocessError):
        pass
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
        if m:
            flags = set(m.group(1).split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    info["flags"] = {f: f in flags for f in wanted}
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_busy(seconds: float = 2.0) -> float | None:
    """Share of all CPUs' time spent busy over the next `seconds` (from /proc/stat), or None.

    Taken before a benchmark starts, this tells whether other work was running; the load average
    lags by a minute and still counts work that has just ended.
    """

    def sample() -> tuple[int, int]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(x) for x in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else round(1 - (idle1 - idle0) / total, 3)


def host_info(measure_busy: bool = False) -> dict:
    """What a result needs to be read against: machine, load, Python, time."""
    return {
        "cpu": cpu_info(),
        "cpu_busy_before": cpu_busy() if measure_busy else None,
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summarize(samples: list[float]) -> dict:
    """Median, min, max and count of timing samples (seconds)."""
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
    }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of sorted values, nearest rank."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` as indented JSON (creating folders), and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {display_path(path)}", file=sys.stderr)
    return path


def display_path(path: str | Path) -> str:
    """A path relative to the repository when it lies inside it (results must not hold /abs)."""
    for p in (Path(os.path.abspath(path)), Path(path).resolve()):
        try:
            return str(p.relative_to(REPO))
        except ValueError:
            continue
    return Path(path).name


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
