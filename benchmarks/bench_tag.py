"""(d) `ner-stream tag` on archives: the command as a user runs it, on both corpora.

For each corpus kind (`benchmarks.corpus.KINDS`: short feed documents and ~180-word articles)
the documents are written to a JSONL file and tagged with `ner-stream tag FILE -o OUT` in a
fresh process, repeats times; the same command on an empty file gives the start-up (interpreter,
torch, model load). Reported per kind: wall seconds (median), words/s with and without the
start-up, and ner-stream tokens/s. Words are whitespace-separated words of the texts, the unit
compared with spaCy on the same texts (bench_spacy.py --kind).

    python -m benchmarks.bench_tag --out benchmarks/results/tag.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, host_info, log, quick_mode, summarize, write_json
from benchmarks.corpus import DEFAULT_SEED, KINDS, documents

NER_STREAM = [sys.executable, "-m", "ner_stream"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="`ner-stream tag` on files of both corpora.")
    p.add_argument("--model", help="model file (default: the packaged model)")
    p.add_argument("--short-docs", type=int, default=None)
    p.add_argument("--long-docs", type=int, default=None)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (also BENCH_QUICK=1)")
    p.add_argument("--out", default=str(RESULTS / "tag.json"))
    args = p.parse_args(argv)
    args.quick = quick_mode(args.quick)
    args.short_docs = args.short_docs or (300 if args.quick else 5000)
    args.long_docs = args.long_docs or (100 if args.quick else 1500)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def timed_tag(args: argparse.Namespace, path: Path, out: Path) -> float:
    """Seconds of one `ner-stream tag` process over `path`; raises when it fails."""
    cmd = [*NER_STREAM, "tag", "--no-progress", "-o", str(out), str(path)]
    if args.model:
        cmd[4:4] = ["--model", args.model]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"ner-stream tag exited with {r.returncode}: {r.stderr[-500:]}")
    return seconds


def tokens_of(texts: list[str]) -> int:
    """Tokens the worker's text path gives these texts (default windows)."""
    from ner_stream.config import WorkerConfig
    from ner_stream.text import document_windows

    limit = WorkerConfig().max_chunk_tokens
    return sum(len(w) for t in texts for w in document_windows(t, limit))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = {"short": args.short_docs, "long": args.long_docs}
    result: dict = {
        "benchmark": "tag",
        "mode": "quick" if args.quick else "full",
        "host": host_info(),
        "settings": {"repeats": args.repeats, "seed": args.seed, "model": args.model},
        "kinds": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-tag-") as tmp:
        folder = Path(tmp)
        empty = folder / "empty.jsonl"
        empty.write_text("", encoding="utf-8")
        out = folder / "out.jsonl"
        start = summarize([timed_tag(args, empty, out) for _ in range(args.repeats)])
        result["start_up_s"] = start
        log(f"ner-stream tag start-up (empty input): {start['median']:.2f} s")
        for kind in KINDS:
            docs = documents(sizes[kind], args.seed, kind=kind)
            path = folder / f"{kind}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
            texts = [d["text"] for d in docs]
            words = sum(len(t.split()) for t in texts)
            tokens = tokens_of(texts)
            wall = summarize([timed_tag(args, path, out) for _ in range(args.repeats)])
            outputs = len(out.read_text(encoding="utf-8").splitlines())
            work = max(wall["median"] - start["median"], 1e-9)
            run = {
                "docs": len(docs),
                "words": words,
                "tokens": tokens,
                "outputs": outputs,
                "seconds": wall,
                "words_per_s": words / work,
                "words_per_s_with_start_up": words / wall["median"],
                "tokens_per_s": tokens / work,
            }
            result["kinds"][kind] = run
            log(
                f"  {kind}: {len(docs)} docs, {words:,} words in {wall['median']:.1f} s: "
                f"{run['words_per_s']:,.0f} words/s after start-up "
                f"({run['words_per_s_with_start_up']:,.0f} with it)"
            )
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
