"""Run every benchmark, write benchmarks/results/*.json, and regenerate docs/benchmarks.md.

    make bench                                   # the full run (about 10 minutes on 2 cores)
    BENCH_QUICK=1 make bench                     # smoke run: small sizes, a minute or two
    make bench BENCH_ARGS="--model my.nerm"      # another model file
    python -m benchmarks.run_all --only model    # one part: model, e2e, spacy, tag

Steps: (a) the model core (bench_model.py), (b) end to end through the local broker
(bench_e2e.py; the broker is started with deploy/kafka/kafka.sh when it is not running, and
stopped afterwards only in that case; then a saturation run on the long-article corpus), (c) spaCy
as the peer on both corpora (setup-spacy.sh, then bench_spacy.py in its own venv; when spaCy
cannot be installed, its result says so and the rest stands), (d) `ner-stream tag` on files of
both corpora (bench_tag.py). Then the
ratios against the targets are computed from the results of this same run (results/summary.json)
and the tables between the `<!-- generated:NAME -->` markers of docs/benchmarks.md are rewritten.
Before each part and at the end, a speed probe (`speed_probe`: one BiLSTM pass of the model's
shape on one thread) records how fast the machine was at that moment: on a shared host the
parts of one run can see different machines, and the environment table shows by how much.

Environment: BENCH_QUICK=1 (smoke sizes), BENCH_MODEL (model file), BENCH_THREADS (torch threads
of the model bench and OMP_NUM_THREADS of the worker; default: torch's default, one per core),
BENCH_DOCS (documents of the end-to-end saturation run), BENCH_ONLY (e.g. "model,e2e").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    RESULTS,
    display_path,
    host_info,
    log,
    quick_mode,
    write_json,
)

HERE = Path(__file__).resolve().parent
KAFKA = REPO / "deploy" / "kafka" / "kafka.sh"
DOC = REPO / "docs" / "benchmarks.md"
SPACY_PY = HERE / ".venv-spacy" / "bin" / "python"
PARTS = ("model", "e2e", "spacy", "tag")
GIB = 1024**3
BUSY_THRESHOLD = 0.15  # share of CPU time used by other work before the run

TARGETS = {
    "e2e_vs_model_core": 0.80,
    # Set on an AVX-512 machine, where matmul is a fair ceiling; kept as a figure, not a goal.
    "model_core_efficiency": None,
    "e2e_vs_spacy": 5.0,
    "tag_vs_spacy": 5.0,
    "rss_bytes": 2 * GIB,
    "exactly_once_cost": 0.15,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run all benchmarks and update docs/benchmarks.md.")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (also BENCH_QUICK=1)")
    p.add_argument("--model", default=os.environ.get("BENCH_MODEL"), help="model file")
    p.add_argument("--only", default=os.environ.get("BENCH_ONLY", ",".join(PARTS)))
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON results")
    p.add_argument("--doc", default=str(DOC), help="Markdown file whose tables are regenerated")
    p.add_argument("--no-doc", action="store_true", help="leave the Markdown file alone")
    p.add_argument("--e2e-arg", action="append", default=[], help="extra bench_e2e.py argument")
    p.add_argument("--model-arg", action="append", default=[], help="extra bench_model.py arg")
    p.add_argument("--spacy-arg", action="append", default=[], help="extra bench_spacy.py arg")
    args = p.parse_args(argv)
    args.quick = quick_mode(args.quick)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    for part in args.only:
        if part not in PARTS:
            p.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    return args


def run(cmd: list[str], timeout: float, env: dict | None = None) -> int:
    shown = [display_path(c) if c.startswith("/") else c for c in cmd]
    shown[0] = "python" if cmd[0] == sys.executable else shown[0]
    log("$ " + " ".join(shown))
    try:
        return subprocess.run(cmd, cwd=REPO, timeout=timeout, env=env, check=False).returncode
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout:.0f} s")
        return 124


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def broker_running() -> bool:
    """kafka.sh's broker is up, or something else already listens on its port."""
    if subprocess.run([str(KAFKA), "status"], capture_output=True, check=False).returncode == 0:
        return True
    port = int(os.environ.get("KAFKA_PORT", "9092"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def git_state() -> dict:
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "-s"))}


# ------------------------------------------------------------------------------------ steps


def step_model(args, out: Path) -> int:
    cmd = [sys.executable, "-m", "benchmarks.bench_model", "--out", str(out), *args.model_arg]
    if args.model:
        cmd += ["--model", args.model]
    if args.quick:
        cmd.append("--quick")
    return run(cmd, timeout=1200)


LONG_DOCS = 8000  # articles of the long corpus's saturation run (about 1.5 M words)


def step_e2e(args, out: Path) -> int:
    """The end-to-end benchmark on the short corpus, then a saturation run on the long one
    (written beside `out` as e2e-long.json)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", *args.e2e_arg]
    if args.model:
        cmd += ["--model", args.model]
    if args.quick:
        cmd.append("--quick")
    long_run = [*cmd, "--kind", "long", "--rates", "", "--no-exactly-once"]
    long_run += ["--docs", str(300 if args.quick else LONG_DOCS)]
    started = False
    if not broker_running():
        log("starting the local Kafka broker (stopped again at the end)")
        if run([str(KAFKA), "up"], timeout=600) != 0:
            log("the local broker did not start")
            return 1
        started = True
    try:
        code = run([*cmd, "--out", str(out)], timeout=1800)
        long_out = out.with_name("e2e-long.json")
        return code or run([*long_run, "--out", str(long_out)], timeout=900)
    finally:
        if started:
            run([str(KAFKA), "down"], timeout=120)


def spacy_unavailable(out: Path, args, reason: str) -> None:
    write_json(
        out,
        {
            "benchmark": "spacy",
            "mode": "quick" if args.quick else "full",
            "available": False,
            "reason": reason,
            "host": host_info(),
        },
    )


def step_spacy(args, out: Path) -> int:
    setup = HERE / "setup-spacy.sh"
    log("$ benchmarks/setup-spacy.sh")
    try:
        r = subprocess.run(
            [str(setup)], cwd=REPO, capture_output=True, text=True, timeout=900, check=False
        )
        sys.stderr.write(r.stderr)
        ok, detail = r.returncode == 0, r.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        ok, detail = False, ["setup-spacy.sh timed out"]
    if not ok or not SPACY_PY.exists():
        spacy_unavailable(out, args, "setup-spacy.sh failed: " + " / ".join(detail))
        return 0
    for kind, path in (("short", out), ("long", out.with_name("spacy-long.json"))):
        cmd = [str(SPACY_PY), "-m", "benchmarks.bench_spacy", "--out", str(path)]
        cmd += ["--kind", kind, *args.spacy_arg]
        if args.quick:
            cmd.append("--quick")
        code = run(cmd, timeout=1200)
        if code != 0 or read_json(path) is None:
            spacy_unavailable(path, args, f"bench_spacy.py exited with status {code}")
    return 0


def step_tag(args, out: Path) -> int:
    cmd = [sys.executable, "-m", "benchmarks.bench_tag", "--out", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    if args.quick:
        cmd.append("--quick")
    return run(cmd, timeout=1200)


def ner_stream_tokens(docs: int, seed: int) -> int:
    """Tokens the worker would tag for the first `docs` corpus documents (default chunking)."""
    from benchmarks.corpus import documents
    from ner_stream.config import WorkerConfig
    from ner_stream.text import document_windows

    limit = WorkerConfig().max_chunk_tokens
    return sum(len(c) for d in documents(docs, seed) for c in document_windows(d["text"], limit))


# ------------------------------------------------------------------------------------ summary


def best_words_per_s(spacy: dict | None) -> float | None:
    """spaCy's best words/s (1 or 2 processes) in a bench_spacy result, None when unmeasured."""
    if not spacy or not spacy.get("available"):
        return None
    return max((r.get("words_per_s") or 0 for r in spacy["runs"]), default=None) or None


def e2e_words_per_s(e2e: dict | None) -> float | None:
    """Words/s of a bench_e2e saturation run (its documents/s times words per document)."""
    if not e2e or not e2e.get("saturation", {}).get("docs_per_s"):
        return None
    st = e2e["settings"]
    words = st.get("words")
    return e2e["saturation"]["docs_per_s"] * words / st["docs"] if words else None


def corpora(
    e2e: dict | None, e2e_long: dict | None, tag: dict | None, spacy: dict | None,
    spacy_long: dict | None,
) -> dict:  # fmt: skip
    """Words/s of the worker, `ner-stream tag` and spaCy's best, per corpus kind."""
    kinds = (tag or {}).get("kinds", {})
    return {
        kind: {
            "worker": e2e_words_per_s(worker),
            "tag": kinds.get(kind, {}).get("words_per_s"),
            "tag_start_up_s": ((tag or {}).get("start_up_s") or {}).get("median"),
            "spacy": best_words_per_s(peer),
        }
        for kind, worker, peer in (("short", e2e, spacy), ("long", e2e_long, spacy_long))
    }


def summarize(
    model: dict | None,
    e2e: dict | None,
    spacy: dict | None,
    e2e_long: dict | None = None,
    tag: dict | None = None,
    spacy_long: dict | None = None,
) -> dict:
    s: dict = {"targets": {}}
    core_tps = eff = None
    if model:
        core_tps = model["summary"]["tokens_per_s_bucketed_fp32"]
        eff = model["summary"]["efficiency_bucketed_fp32"]
    e2e_tps = e2e and e2e["summary"]["tokens_per_s"]
    if spacy and spacy.get("available"):
        tokens = ner_stream_tokens(spacy["corpus"]["docs"], spacy["corpus"]["seed"])
        per_doc = tokens / spacy["corpus"]["docs"]
        for r in spacy["runs"]:
            r["ner_stream_tokens_per_s"] = r["docs_per_s"] * per_doc
        best = max(spacy["runs"], key=lambda r: r["docs_per_s"])
        s["spacy"] = {
            "ner_stream_tokens": tokens,
            "best_processes": best["processes"],
            "best_ner_stream_tokens_per_s": best["ner_stream_tokens_per_s"],
            "runs": spacy["runs"],
        }
    spacy_tps = s.get("spacy", {}).get("best_ner_stream_tokens_per_s")

    def target(name: str, value, goal, op: str, note: str) -> None:
        met = None
        if value is not None and goal is not None:
            met = value >= goal if op == ">=" else value <= goal
        s["targets"][name] = {"value": value, "target": goal, "op": op, "met": met, "note": note}

    target(
        "e2e_vs_model_core",
        e2e_tps / core_tps if e2e_tps and core_tps else None,
        TARGETS["e2e_vs_model_core"],
        ">=",
        "end-to-end tokens/s / model-core tokens/s (bucketed, fp32)",
    )
    target(
        "model_core_efficiency",
        eff,
        TARGETS["model_core_efficiency"],
        ">=",
        "model FLOP/s on bucketed corpus batches / fp32 matmul FLOP/s (a figure, target retired)",
    )
    target(
        "e2e_vs_spacy",
        e2e_tps / spacy_tps if e2e_tps and spacy_tps else None,
        TARGETS["e2e_vs_spacy"],
        ">=",
        "end-to-end tokens/s / spaCy's best tokens/s (both in ner-stream tokens)",
    )
    es = e2e["summary"] if e2e else {}
    target(
        "p99_at_half_rate_s",
        es.get("p99_at_half_s"),
        es.get("p99_bound_s"),
        "<=",
        "p99 latency at half the saturating rate vs max-wait + 3 x one micro-batch's inference",
    )
    target(
        "p99_at_three_quarters_rate_s",
        es.get("p99_at_three_quarters_s"),
        es.get("p99_bound_s"),
        "<=",
        "p99 latency at 75% of the saturating rate vs the same bound",
    )
    target(
        "peak_rss_bytes",
        es.get("peak_rss_bytes"),
        TARGETS["rss_bytes"],
        "<=",
        "worker peak RSS (VmHWM, with its model process)",
    )
    target(
        "exactly_once_cost",
        es.get("exactly_once_cost"),
        TARGETS["exactly_once_cost"],
        "<=",
        "end-to-end documents/s lost with exactly-once (1 - exactly-once / at-least-once)",
    )
    words = corpora(e2e, e2e_long, tag, spacy, spacy_long)
    s["corpora"] = words

    def ratio(a, b):
        return a / b if a and b else None

    for kind in ("short", "long"):
        w = words[kind]
        target(
            f"tag_vs_spacy_{kind}",
            ratio(w["tag"], w["spacy"]),
            TARGETS["tag_vs_spacy"],
            ">=",
            f"`ner-stream tag` words/s / spaCy's best words/s, {kind} corpus",
        )
    target(
        "e2e_vs_spacy_long",
        ratio(words["long"]["worker"], words["long"]["spacy"]),
        TARGETS["e2e_vs_spacy"],
        ">=",
        "end-to-end words/s / spaCy's best words/s, long corpus",
    )
    core_long = (model or {}).get("summary", {}).get("tokens_per_s_bucketed_fp32_long")
    e2e_long_tps = e2e_long and e2e_long["summary"]["tokens_per_s"]
    target(
        "e2e_vs_model_core_long",
        ratio(e2e_long_tps, core_long),
        TARGETS["e2e_vs_model_core"],
        ">=",
        "end-to-end tokens/s / model-core tokens/s, long corpus",
    )
    s["figures"] = {
        "exactly_once_docs_per_s": es.get("exactly_once_docs_per_s"),
        "exactly_once_p99_at_half_s": es.get("exactly_once_p99_at_half_s"),
        "model_core_tokens_per_s": core_tps,
        "model_core_tokens_per_s_long": core_long,
        "e2e_tokens_per_s_long": e2e_long_tps,
        "model_core_tokens_per_s_one_thread": (model or {})
        .get("summary", {})
        .get("tokens_per_s_bucketed_fp32_one_thread"),
        "e2e_tokens_per_s": e2e_tps,
        "e2e_docs_per_s": es.get("docs_per_s"),
        "spacy_best_tokens_per_s": spacy_tps,
    }
    return s


# ------------------------------------------------------------------------------------ Markdown


def fmt(x, digits: int = 0, scale: float = 1.0, unit: str = "") -> str:
    if x is None:
        return "n/a"
    v = x * scale
    return f"{v:,.{digits}f}{unit}"


def ms(x) -> str:
    return fmt(x, 0, 1000, " ms")


def secs(x) -> str:
    return fmt(x, 1, 1, " s")


def cores(c: dict | None) -> str:
    """Cores busy while a rate was offered (bench_e2e's `cpu_cores`), "n/a" for older results."""
    if not c:
        return "n/a"
    return f"{c['machine']:.2f} / {c['load_generator']:.2f} / {c['worker']:.2f}"


def model_busy(run: dict) -> float | None:
    """The share of a latency run's time the model was busy: offered documents/s times the
    inference time per document (None when no micro-batch ran)."""
    b = run["batches"]
    docs, inference = b.get("mean_docs_per_micro_batch"), b.get("mean_inference_s_per_micro_batch")
    if not docs or inference is None:
        return None
    return run["offered_docs_per_s"] * inference / docs


def pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def banner(meta: dict) -> str:
    notes = []
    if meta["quick"]:
        notes.append(
            "**Smoke run** (`BENCH_QUICK=1`: small sizes, few repeats). These figures only show "
            "that the scripts work; they are not the project's benchmark results."
        )
    busy = meta.get("cpu_busy_before")
    if busy is not None and busy > BUSY_THRESHOLD:
        notes.append(
            f"The machine was **busy**: {busy:.0%} of its CPU time was taken by other work just "
            "before the run, so the figures below are depressed by that work."
        )
    return "\n>\n".join(f"> {n}" for n in notes) + ("\n\n" if notes else "")


def doc_blocks(meta: dict, model, e2e, spacy, summary) -> dict[str, str]:
    blocks: dict[str, str] = {}
    head = banner(meta)

    kind = "smoke (quick)" if meta["quick"] else "full"
    dirty = " (uncommitted changes)" if meta["git"]["dirty"] else ""
    load = ", ".join(f"{x:.2f}" for x in meta["load_average"] or [])
    env_rows = [
        ["run", f"{meta['time_utc']}, {kind}, commit {meta['git']['commit']}{dirty}"],
        ["CPU", f"{meta['cpu_model']}, {meta['cpus']} CPUs usable"],
        ["CPU flags", meta["cpu_flags"]],
        ["CPU busy just before the run", pct(meta.get("cpu_busy_before"))],
        [
            "speed probe before each part and at the end (ms a BiLSTM pass, one thread)",
            probes_row(meta.get("speed_probes_ms") or {}),
        ],
        ["load average at start", load],
        ["Python", meta["python"]],
        ["torch", f"{meta['torch']} ({meta['torch_threads']} threads)"],
        ["kafka-python", meta["kafka_python"] or "n/a"],
        ["Kafka broker", meta["kafka_broker"] or "n/a"],
        ["spaCy", meta["spacy"] or "not installed"],
        ["model", meta["model"]],
        ["wall time", f"{meta['wall_s']:.0f} s"],
    ]
    blocks["environment"] = head + table(["", ""], env_rows)

    rows = []
    for name, t in summary["targets"].items():
        v, goal = t["value"], t["target"]
        if name.endswith("bytes"):
            vs, gs = fmt(v, 2, 1 / GIB, " GiB"), fmt(goal, 2, 1 / GIB, " GiB")
        elif name.endswith("_s"):
            vs, gs = fmt(v, 0, 1000, " ms"), fmt(goal, 0, 1000, " ms")
        elif "vs_spacy" in name:
            vs, gs = fmt(v, 2, 1, "x"), fmt(goal, 1, 1, "x")
        else:
            vs, gs = pct(v), pct(goal)
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        rows.append([t["note"], vs, f"{t['op']} {gs}", met])
    blocks["summary"] = head + table(["ratio (same run)", "measured", "target", "met"], rows)
    one = summary["figures"].get("model_core_tokens_per_s_one_thread")
    e2e_tps = summary["figures"].get("e2e_tokens_per_s")
    if one and e2e_tps:
        blocks["summary"] += (
            f"\n\nFor reference, not a target: the worker gives the model one thread on this "
            f"machine (every core but one); the model core on one thread ran at {one:,.0f} "
            f"tokens/s, and end to end is {e2e_tps / one:.1%} of that."
        )

    if model:
        mm = model["matmul"]
        mrows = [
            [
                d,
                fmt(v["gflops"], 1),
                fmt(v.get("gflops_best"), 1),
                str(v["n"]),
                str(v["seconds"]["n"]),
            ]
            for d, v in mm.items()
        ]
        prec = model["precision"]
        prows = []
        for d, p in prec.items():
            if p["supported"]:
                seen = p["dtypes_seen"]
                desc = ", ".join(f"{k} {v}" for k, v in seen.items())
                prows.append([d, "emulated" if p.get("emulated") else "yes", desc])
            else:
                prows.append([d, "**no**", p["error"]])
        srows = [
            [
                r["dtype"], str(r["batch"]), str(r["length"]), fmt(r["tokens_per_s"]),
                fmt(r["model_gflops"], 1), pct(r["efficiency_vs_matmul"]),
                str(r["seconds"]["n"]),
            ]
            for r in model["shapes"]
        ]  # fmt: skip
        c = model["corpus"]
        crows = [
            [
                r["dtype"], str(r.get("threads", model["torch"]["threads"])),
                "on" if r["buckets"] else "off", str(r["forward_passes"]),
                pct(r["padding_ratio"]), fmt(r["tokens_per_s"]), fmt(r["model_gflops"], 1),
                pct(r["efficiency_vs_matmul"]), str(r["seconds"]["n"]),
            ]
            for r in c["runs"]
        ]  # fmt: skip
        fpt = model["model"]["flops_per_token"]
        blocks["model"] = (
            head + f"Model `{model['model']['name']}` {model['model']['version']}: "
            f"{fmt(fpt['total'] / 1e6, 3)} MFLOP per token (LSTM {fmt(fpt['lstm'] / 1e6, 3)}, "
            f"projection {fmt(fpt['projection'] / 1e6, 3)}, character CNN "
            f"{fmt(fpt['char_encoder'] / 1e6, 3)} at {fpt['mean_chars_per_token']:.1f} characters, "
            f"CRF {fmt(fpt['crf'] / 1e6, 4)}); {model['torch']['threads']} torch threads; "
            f"bf16 native on this CPU: {model['torch']['bf16_native']}.\n\n"
            + table(["dtype", "matmul GFLOP/s (median)", "best", "N", "samples"], mrows)
            + "\n\n"
            + table(["dtype", "runs", "dtypes seen (LSTM, projection, CRF)"], prows)
            + "\n\nFull batches (every position a real token):\n\n"
            + table(
                ["dtype", "batch", "length", "tokens/s", "GFLOP/s", "vs matmul", "repeats"], srows
            )
            + f"\n\nCorpus: {c['docs']} documents, {c['sequences']} sentences, "
            f"{c['real_tokens']:,} tokens in {c['micro_batches']} micro-batches "
            f"(the worker's limits: {model['settings']['micro_batch_docs']} documents, "
            f"{model['settings']['micro_batch_tokens']} tokens):\n\n"
            + table(
                [
                    "dtype",
                    "threads",
                    "buckets",
                    "forward passes",
                    "padding",
                    "tokens/s",
                    "GFLOP/s",
                    "vs matmul",
                    "repeats",
                ],
                crows,
            )  # fmt: skip
        )
        lc = model.get("long_corpus")
        if lc:
            blocks["model"] += (
                f"\n\nThe long-article corpus, the same way (fp32, buckets on, {lc['threads']} "
                f"threads): {lc['docs']} articles, {lc['sequences']} sentences, "
                f"{lc['real_tokens']:,} tokens in {lc['micro_batches']} micro-batches, "
                f"{lc['forward_passes']} forward passes, padding {pct(lc['padding_ratio'])}: "
                f"**{fmt(lc['tokens_per_s'])} tokens/s** ({lc['seconds']['n']} repeats)."
            )
        if "text_path" in model:
            trows = [
                [r["texts"], f"`{r['line_breaks']}`", fmt(r["tokens_per_s"]),
                 str(r["seconds"]["n"])]
                for r in model["text_path"]["runs"]
            ]  # fmt: skip
            blocks["model"] += (
                "\n\nText path (`Tagger.prepare`: tokenizing, sentence splitting with each "
                "`--line-breaks` mode, chunking, encoding; one core), the same "
                f"{model['text_path']['docs']} documents as they are and hard-wrapped at 72 "
                "columns:\n\n" + table(["texts", "--line-breaks", "tokens/s", "repeats"], trows)
            )

    if e2e:
        sat = e2e["saturation"]
        b = sat["batches"]
        w = sat["worker"]
        window = sat["window_s"]
        busy = b["inference_s_total"] / window if window else None
        cut = "" if sat["complete"] else " (stopped by the time limit)"
        rows = [
            ["documents done", f"{sat['distinct_outputs']:,} of {sat['docs']:,}{cut}"],
            ["tokens per document (worker counter)", fmt(sat["tokens_per_doc"], 1)],
            ["window (first to last output append)", fmt(window, 1, 1, " s")],
            ["documents/s", fmt(sat["docs_per_s"])],
            ["tokens/s", fmt(sat["tokens_per_s"])],
            ["micro-batches", fmt(b["micro_batches"])],
            ["mean documents per micro-batch", fmt(b["mean_docs_per_micro_batch"], 1)],
            ["mean inference per micro-batch", ms(b["mean_inference_s_per_micro_batch"])],
            ["share of the window spent in inference", pct(busy)],
            ["mean padding of forward passes", pct(b["mean_padding_ratio"])],
            ["worker start to ready (model load, group join)", secs(sat["worker_ready_s"])],
            ["shutdown on SIGTERM (exit status)", f"{secs(w['shutdown_s'])} ({w['exit_code']})"],
            ["producing the input beforehand", f"{fmt(sat['produce']['docs_per_s'])} docs/s"],
        ]
        lat = e2e["latency"]
        lrows = [
            [
                pct(r["fraction"]), fmt(r["offered_docs_per_s"], 1), str(r["sent"]),
                str(r["measured"]), fmt(r["p50_s"], 0, 1000), fmt(r["p90_s"], 0, 1000),
                fmt(r["p99_s"], 0, 1000), fmt(r["max_s"], 0, 1000),
                fmt(r["batches"]["mean_docs_per_micro_batch"], 1),
                fmt(r["batches"]["mean_inference_s_per_micro_batch"], 0, 1000),
                fmt(r["batches"].get("mean_batch_wait_s"), 0, 1000),
                pct(model_busy(r)),
                fmt(r.get("producer_lateness_p99_s"), 0, 1000),
                str(r["missing_after_drain"]),
                cores(r.get("cpu_cores")),
            ]
            for r in lat["runs"]
        ]  # fmt: skip
        rss = [
            ["saturation worker", fmt(sat["worker"]["peak_rss_bytes"], 0, 1 / 2**20, " MiB")],
            ["latency worker", fmt(lat["worker"]["peak_rss_bytes"], 0, 1 / 2**20, " MiB")],
        ]
        st = e2e["settings"]
        blocks["e2e"] = (
            head + f"One worker, {st['partitions']} input partitions, `--max-wait-ms "
            f"{st['max_wait_ms']}`, other settings at their defaults.\n\n"
            + table(["saturation", ""], rows)
            + f"\n\nOpen-loop latency, {st['rate_seconds']:g} s per rate, the first "
            f"{st['warmup_seconds']:g} s of each left out (milliseconds; rates as a share of "
            "the saturating documents/s, which was measured with the input produced beforehand; "
            "the oldest document of each micro-batch's mean wait from the work queue to the model; "
            "the model's busy share, the offered documents/s times the inference per document; "
            "how late the load generator's sends were, which counts in the latency; cores busy "
            "while the rate was offered: the whole machine, the load generator "
            f"(niceness {st.get('generator_nice', 0)}) and the worker with its model process, the "
            "rest being mostly the broker):\n\n"
            + table(
                [
                    "rate",
                    "docs/s",
                    "sent",
                    "measured",
                    "p50",
                    "p90",
                    "p99",
                    "max",
                    "docs/micro-batch",
                    "inference/micro-batch",
                    "oldest's wait for the model",
                    "model busy",
                    "load generator late, p99",
                    "missing",
                    "cores busy: all / load generator / worker",
                ],
                lrows,
            )  # fmt: skip
            + "\n\n"
            + table(["peak RSS (VmHWM, worker + model process)", ""], rss)
        )
        eos = e2e.get("exactly_once")
        if eos:
            es = e2e["summary"]
            half = min(lat["runs"], key=lambda r: abs(r["fraction"] - 0.5), default=None)
            erun = eos["latency"]["runs"][0] if eos["latency"]["runs"] else None
            erows = [
                ["at-least-once", fmt(sat["docs_per_s"]), fmt(sat["tokens_per_s"]),
                 fmt(half and half["p99_s"], 0, 1000), "broker append time"],
                ["exactly-once", fmt(eos["saturation"]["docs_per_s"]),
                 fmt(eos["saturation"]["tokens_per_s"]), fmt(erun and erun["p99_s"], 0, 1000),
                 "received by a read_committed reader"],
            ]  # fmt: skip
            blocks["e2e"] += (
                "\n\nExactly once against at least once, this run (`--processing-guarantee`, "
                "default `--commit-interval-ms`; p99 latency in ms at half the at-least-once "
                f"saturating rate; throughput cost {pct(es.get('exactly_once_cost'))}):\n\n"
                + table(
                    ["guarantee", "docs/s", "tokens/s", "p99 at half", "output counted when"], erows
                )  # fmt: skip
            )

    if spacy is not None:
        if not spacy.get("available"):
            blocks["spacy"] = head + f"spaCy was not measured: {spacy.get('reason')}"
        else:
            sp = spacy["spacy"]
            runs = summary.get("spacy", {}).get("runs", spacy["runs"])
            rows = [
                [
                    str(r["processes"]), fmt(r["docs_per_s"], 1), fmt(r["spacy_tokens_per_s"]),
                    fmt(r.get("ner_stream_tokens_per_s")), str(r["seconds"]["n"]),
                ]
                for r in runs
            ]  # fmt: skip
            blocks["spacy"] = (
                head + f"spaCy {sp['version']}, pipeline package `{sp['pipeline_package']}` "
                f"{sp['pipeline_version']}, running {', '.join(sp['pipes'])} (disabled: "
                f"{', '.join(sp['disabled'])}), `nlp.pipe(batch_size={sp['batch_size']})`, "
                f"{spacy['corpus']['docs']} documents:\n\n"
                + table(
                    ["processes", "docs/s", "spaCy tokens/s", "ner-stream tokens/s", "repeats"],
                    rows,
                )
            )
    words = summary.get("corpora")
    if words and any(v for w in words.values() for k, v in w.items() if k != "tag_start_up_s"):
        rows = []
        for kind, w in words.items():
            for system, key in (("worker end to end", "worker"), ("`ner-stream tag`", "tag")):
                ratio = w[key] / w["spacy"] if w[key] and w["spacy"] else None
                rows.append([kind, system, fmt(w[key]), fmt(ratio, 2, 1, "x")])
            rows.append([kind, "spaCy small, best of 1 or 2 processes", fmt(w["spacy"]), "1x"])
        start = words["short"].get("tag_start_up_s")
        blocks["corpora"] = (
            head + "Words/s (whitespace-separated words of the same texts) on the short-document "
            "corpus and on the long-article corpus (about 180 words per document). The worker: "
            "saturation runs through the broker; `ner-stream tag`: a file tagged with `-o`, the "
            f"start-up (interpreter, torch, model: {secs(start)}) taken out; spaCy: tok2vec + "
            "ner.\n\n" + table(["corpus", "system", "words/s", "vs spaCy"], rows)
        )
    return blocks


def gpu_block(gpu: dict | None) -> str | None:
    """The (d) tables, from `benchmarks.bench_gpu` results written on a GPU machine."""
    if not gpu:
        return None
    dev = gpu["device"]
    mm = gpu["matmul_tflops"]
    ag = gpu["agreement"]
    host = gpu["host_stages"]
    out = [
        f"Run {gpu['host']['time_utc']} on {dev['name']} (torch {dev['torch']}, CUDA "
        f"{dev['cuda']}, cuDNN {dev['cudnn']}), host CPU {gpu['host']['cpu'].get('model_name')}; "
        f"dense matmul {mm['fp32']:.0f} TFLOP/s fp32, {mm['tf32']:.0f} tf32, {mm['bf16']:.0f} "
        f"bf16. CPU and GPU taggers on {ag['docs']} documents: {ag['entities_same']:,} entities "
        f"the same, {ag['entities_differ']} different, scores within {ag['max_score_diff']:.1e}."
        "\n",
    ]
    shapes = [r for r in gpu["shapes"] if "error" not in r]
    lengths = sorted({r["length"] for r in shapes})
    batches = sorted({r["batch"] for r in shapes})
    for dtype in ("fp32", "bf16", "fp16"):
        rows = []
        for b in batches:
            cells = [str(b)]
            for t in lengths:
                r = next(
                    (x for x in shapes if (x["dtype"], x["batch"], x["length"]) == (dtype, b, t)),
                    None,
                )
                cells.append(
                    "n/a"
                    if r is None
                    else f"{r['tokens_per_s'] / 1e6:.1f}M ({r['network_tokens_per_s'] / 1e6:.1f}M"
                    f", CRF {r['crf_share']:.0%})"
                )
            rows.append(cells)
        out.append(
            f"`NerModel.decode` on full batches, {dtype}: tokens/s with the CRF (network alone, "
            "CRF share of the time):\n\n"
            + table(["batch"] + [f"T = {t}" for t in lengths], rows)
            + "\n"
        )
    runs = gpu["tagger"]
    rows = [
        [
            f"{r['docs_per_call']:,}",
            fmt(r["tokens_per_s"]),
            secs(r.get("model_s")) if "model_s" in r else "n/a",
            secs(r.get("spans_s")) if "spans_s" in r else "n/a",
        ]
        for r in runs
    ]
    out.append(
        f"The worker's tagging path (`Tagger.tag_prepared`: host padding, copies, network, CRF, "
        f"span decoding) over {host['docs']:,} corpus documents ({host['tokens']:,} tokens):\n\n"
        + table(["documents per call", "tokens/s", "model part", "span decoding"], rows)
        + "\n"
    )
    per_core = host["tokens_per_s_one_core"]
    out.append(
        f"Host stages on one core of that machine (input JSON, tokenizing and encoding, output "
        f"JSON; Kafka client not included): {per_core:,.0f} tokens/s."
    )
    return "\n".join(out)


def speed_probe(seconds: float = 1.0) -> float:
    """Milliseconds of one bidirectional LSTM pass of the packaged model's shape (input 108,
    hidden 128 a direction, 128 rows x 24 steps, fp32, one torch thread), the median of the
    passes of about `seconds`: the machine's speed at that moment. Taken before each part and
    at the end of a run, it shows when the parts ran on a machine of different speeds (a shared
    host), which a ratio of two parts then carries."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        lstm = torch.nn.LSTM(108, 128, bidirectional=True, batch_first=True)
        x = torch.randn(128, 24, 108, generator=g)
        samples = []
        with torch.inference_mode():
            lstm(x)  # warm-up (oneDNN primitive)
            until = time.perf_counter() + seconds
            while time.perf_counter() < until or len(samples) < 5:
                t0 = time.perf_counter()
                lstm(x)
                samples.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    samples.sort()
    return samples[len(samples) // 2] * 1000


def probes_row(probes: dict[str, float]) -> str:
    """The speed probes as one table cell: each in ms, and the slowest over the fastest."""
    if not probes:
        return "n/a"
    cells = ", ".join(f"{name} {v:.1f}" for name, v in probes.items())
    return f"{cells} (slowest / fastest {max(probes.values()) / min(probes.values()):.2f})"


def update_doc(path: Path, blocks: dict[str, str]) -> None:
    try:
        text = path.read_text()
    except OSError:
        log(f"{display_path(path)} not found; tables not written")
        return
    for name, body in blocks.items():
        pattern = re.compile(
            rf"(<!-- generated:{name} -->\n).*?(\n<!-- /generated:{name} -->)", re.DOTALL
        )
        if not pattern.search(text):
            log(f"no generated:{name} markers in {display_path(path)}; block skipped")
            continue
        text = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), text)
    path.write_text(text)
    log(f"updated {display_path(path)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.model and not Path(args.model).is_file():
        log(f"model file not found: {args.model}")
        return 2
    if not args.model:
        from ner_stream.checkpoint import default_model_path

        if not default_model_path().is_file():
            log(
                f"the packaged model {display_path(default_model_path())} does not exist yet; "
                "pass --model FILE (or BENCH_MODEL=FILE)"
            )
            return 2
    host = host_info(measure_busy=True)
    status: dict[str, int] = {}
    paths = {p: results / f"{p}.json" for p in PARTS}
    probes: dict[str, float] = {}
    steps = {"model": step_model, "e2e": step_e2e, "spacy": step_spacy, "tag": step_tag}
    for part, step in steps.items():
        if part in args.only:
            probes[part] = speed_probe()
            status[part] = step(args, paths[part])
    probes["end"] = speed_probe()
    log("speed probe, ms a BiLSTM pass: " + probes_row(probes))

    model = read_json(paths["model"]) if status.get("model") == 0 else None
    e2e = read_json(paths["e2e"]) if status.get("e2e") == 0 else None
    e2e_long = read_json(results / "e2e-long.json") if status.get("e2e") == 0 else None
    spacy = read_json(paths["spacy"]) if "spacy" in status else None
    spacy_long = read_json(results / "spacy-long.json") if "spacy" in status else None
    tag = read_json(paths["tag"]) if status.get("tag") == 0 else None
    # A part that was not run this time may still have a result from an earlier run: it is
    # not mixed into this run's ratios.
    summary = summarize(model, e2e, spacy, e2e_long, tag, spacy_long)

    import kafka
    import torch

    cpu = host["cpu"]
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu.get("flags", {}).items())
    meta = {
        "quick": args.quick,
        "time_utc": host["time_utc"],
        "git": git_state(),
        "cpu_model": cpu.get("model_name", "unknown"),
        "cpus": cpu.get("usable_cpus"),
        "cpu_flags": flags,
        "load_average": host["load_average"],
        "cpu_busy_before": host["cpu_busy_before"],
        "python": host["python"],
        "torch": torch.__version__,
        "torch_threads": (model or {}).get("torch", {}).get("threads", torch.get_num_threads()),
        "kafka_python": kafka.__version__,
        "kafka_broker": (e2e or {}).get("versions", {}).get("kafka_broker"),
        "spacy": (spacy or {}).get("spacy", {}).get("version"),
        "model": display_path(args.model) if args.model else "packaged (ner_stream/models)",
        "wall_s": time.time() - t_start,
        "speed_probes_ms": probes,
    }
    summary_doc = {
        "benchmark": "summary",
        "mode": "quick" if args.quick else "full",
        "meta": meta,
        "status": status,
        **summary,
    }
    write_json(results / "summary.json", summary_doc)
    if not args.no_doc:
        blocks = doc_blocks(meta, model, e2e, spacy, summary)
        # (d) comes from a GPU machine, not from this run: its results file is kept as it is.
        gpu = gpu_block(read_json(results / "gpu.json"))
        if gpu:
            blocks["gpu"] = gpu
        update_doc(Path(args.doc), blocks)
    for name, t in summary["targets"].items():
        log(f"{name}: {t['value']} (target {t['op']} {t['target']}): met={t['met']}")
    log(f"all done in {meta['wall_s']:.0f} s")
    failed = [p for p, code in status.items() if code != 0]
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
