"""(c) The peer: spaCy's small English pipeline, NER only, on the same synthetic texts.

Runs in its own environment (benchmarks/.venv-spacy, made by setup-spacy.sh); the project's
environment never has spaCy. Only `tok2vec` and `ner` run: the tagger, parser, lemmatizer and
attribute ruler are disabled. Measured: documents/s and spaCy tokens/s with `nlp.pipe` in one
process and with `n_process=2` (which includes starting the worker processes), medians over
repeats. run_all.py adds the same documents' ner-stream token count, so that both systems are
compared per ner-stream token.

    benchmarks/.venv-spacy/bin/python -m benchmarks.bench_spacy --out benchmarks/results/spacy.json

When spaCy or the pipeline is missing, the result says so ("available": false) and the exit
status is still 0, so that the other benchmarks' results stand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, host_info, log, quick_mode, summarize, write_json
from benchmarks.corpus import DEFAULT_SEED, KINDS, documents

HERE = Path(__file__).resolve().parent
MODEL_FILE = HERE / ".venv-spacy" / "model.txt"
KEEP = ("tok2vec", "ner")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="spaCy NER peer benchmark.")
    p.add_argument("--pipeline", help="pipeline package (default: what setup-spacy.sh chose)")
    p.add_argument("--docs", type=int, default=None)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--kind", choices=sorted(KINDS), default="short", help="corpus kind")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--processes", default="1,2", help="process counts to run, e.g. 1,2")
    p.add_argument("--batch-size", type=int, default=64, help="nlp.pipe batch size")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (also BENCH_QUICK=1)")
    p.add_argument("--out", default=str(RESULTS / "spacy.json"))
    args = p.parse_args(argv)
    args.quick = quick_mode(args.quick)
    if not args.docs:  # about the same number of words for both kinds
        args.docs = (200 if args.quick else 1000) // (3 if args.kind == "long" else 1)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.processes = [int(x) for x in args.processes.split(",") if x.strip()]
    return args


def unavailable(args: argparse.Namespace, reason: str) -> int:
    log(f"spaCy benchmark skipped: {reason}")
    write_json(
        args.out,
        {
            "benchmark": "spacy",
            "mode": "quick" if args.quick else "full",
            "available": False,
            "reason": reason,
            "host": host_info(),
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import spacy
    except ImportError as e:
        return unavailable(args, f"spaCy is not installed in this environment ({e})")
    pipeline = args.pipeline or (MODEL_FILE.read_text().strip() if MODEL_FILE.is_file() else "")
    if not pipeline:
        return unavailable(args, "no English pipeline was installed by setup-spacy.sh")
    try:
        probe = spacy.load(pipeline)
        disable = [name for name in probe.pipe_names if name not in KEEP]
        del probe
        nlp = spacy.load(pipeline, disable=disable)
    except Exception as e:  # noqa: BLE001 - any load failure means "unavailable"
        return unavailable(args, f"cannot load {pipeline}: {type(e).__name__}: {e}")
    if "ner" not in nlp.pipe_names:
        return unavailable(args, f"{pipeline} has no ner component")

    texts = [d["text"] for d in documents(args.docs, args.seed, kind=args.kind)]
    chars = sum(len(t) for t in texts)
    words = sum(len(t.split()) for t in texts)
    log(f"spaCy {spacy.__version__} {pipeline}: pipes {nlp.pipe_names}, {len(texts)} docs")
    for _ in nlp.pipe(texts[:50], batch_size=args.batch_size):  # warm-up
        pass

    runs = []
    tokens = entities = 0
    for procs in args.processes:
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = entities = 0
            for doc in nlp.pipe(texts, batch_size=args.batch_size, n_process=procs):
                tokens += len(doc)
                entities += len(doc.ents)
            samples.append(time.perf_counter() - t0)
        s = summarize(samples)
        run = {
            "processes": procs,
            "seconds": s,
            "docs_per_s": len(texts) / s["median"],
            "spacy_tokens_per_s": tokens / s["median"],
            "words_per_s": words / s["median"],
            "chars_per_s": chars / s["median"],
        }
        runs.append(run)
        log(
            f"  {procs} process(es): {run['docs_per_s']:.0f} docs/s, "
            f"{run['spacy_tokens_per_s']:.0f} spaCy tokens/s"
        )

    meta = nlp.meta
    best = max(runs, key=lambda r: r["docs_per_s"])
    result = {
        "benchmark": "spacy",
        "mode": "quick" if args.quick else "full",
        "available": True,
        "host": host_info(),
        "spacy": {
            "version": spacy.__version__,
            "pipeline_package": pipeline,
            "pipeline": f"{meta.get('lang')}_{meta.get('name')}",
            "pipeline_version": meta.get("version"),
            "pipes": nlp.pipe_names,
            "disabled": disable,
            "batch_size": args.batch_size,
            "cpu_count": os.cpu_count(),
        },
        "corpus": {
            "kind": args.kind,
            "docs": len(texts),
            "words": words,
            "seed": args.seed,
            "chars": chars,
            "spacy_tokens": tokens,
            "entities": entities,
        },
        "settings": {"repeats": args.repeats},
        "runs": runs,
        "best": {"processes": best["processes"], "docs_per_s": best["docs_per_s"]},
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
