"""(a) Model core: tokens/s of the tagger network's forward pass + CRF decoding, no Kafka.

What is timed is `NerModel.decode(batch, with_scores=True)` under `torch.inference_mode()`, as the
worker's `Tagger` calls it: embeddings, character CNN, BiLSTM, projection, Viterbi and the CRF
marginals that give each entity its score. Tokenizing, padding and span decoding are not timed.

Three parts, all with the same number of torch threads:

1. matmul: fp32 and bf16 GFLOP/s of an N x N @ N x N product (the machine's dense peak, roughly);
2. shapes: full batches of B sequences of exactly T tokens (every position real), fp32 and bf16
   (the network cast to bf16 as the worker's `--precision bf16` casts it, CRF in fp32; on a CPU
   without native bf16 it is emulated and slow, so only one shape and the bucketed corpus run);
3. corpus: the synthetic corpus cut into the worker's micro-batches (its document and token
   limits), each run either as the `Tagger` runs it (sorted by length, one forward pass per length
   bucket: "buckets on") or as one forward pass padded to its longest sequence ("buckets off").
   The long-article corpus (about 180 words a document) is timed the same way, buckets on, fp32:
   the worker's end-to-end rate on that corpus is compared with it.

Efficiency = the model's useful FLOP/s (FLOPs per real token from the model's configuration,
times tokens/s) / the matmul FLOP/s of the same dtype. Timings are medians over repeats.

    python -m benchmarks.bench_model --model M.nerm --out benchmarks/results/model.json [--quick]

`--crf` runs only the CRF decoder (`CRF.decode`) on its own (`crf_decoders`): the packaged model's
emissions of typical passes, in rounds; medians per pass. Every entry of `CRF_DECODERS` is timed,
interleaved, with its ratio to the first: to compare a candidate decoder, add it there. With
`--crf-beside-network` a micro-batch's network runs on another thread meanwhile, as the model
process overlaps them.

    python -m benchmarks.bench_model --crf [--crf-shapes 256x32,64x96,8x128] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS,
    SCRATCH,
    display_path,
    host_info,
    log,
    quick_mode,
    summarize,
    write_json,
)
from benchmarks.corpus import DEFAULT_SEED, documents
from ner_stream.batching import BatchLimits, MicroBatcher, Pass, pad_batch, pad_pass, plan_passes
from ner_stream.checkpoint import default_model_path
from ner_stream.config import WorkerConfig
from ner_stream.model import Batch, ModelConfig
from ner_stream.precision import cast_network, cpu_has_native_bf16
from ner_stream.tagger import PreparedDoc, Tagger, TaggerOptions
from ner_stream.text import LINE_BREAK_MODES
from ner_stream.vocab import EncodedSentence

DTYPES = ("fp32", "bf16")
# Passes the worker runs (rows x padded tokens): a full short bucket, a mid one, a few long rows.
CRF_SHAPES = [(256, 32), (64, 96), (8, 128)]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def shapes_of(text: str) -> list[tuple[int, int]]:
    """'256x32,8x128' -> [(256, 32), (8, 128)]."""
    pairs = [x.split("x") for x in text.split(",") if x.strip()]
    return [(int(b), int(t)) for b, t in pairs]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    worker = WorkerConfig()
    p = argparse.ArgumentParser(description="Model-core benchmark (forward + CRF decoding).")
    p.add_argument(
        "--model",
        default=os.environ.get("BENCH_MODEL"),
        help="model file (default: BENCH_MODEL, else the packaged model)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("BENCH_THREADS", "0")),
        help="torch threads (default: BENCH_THREADS, else torch's default)",
    )
    p.add_argument("--batch-sizes", type=ints, default=None, help="e.g. 32,64,128,256")
    p.add_argument("--lengths", type=ints, default=None, help="e.g. 16,32,64")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (median)")
    p.add_argument(
        "--case-budget-s",
        type=float,
        default=None,
        help="fewer repeats when one case would take longer than this",
    )
    p.add_argument("--corpus-docs", type=int, default=None)
    p.add_argument(
        "--long-corpus-docs",
        type=int,
        default=None,
        help="articles of the long corpus timed as the short one is (0: none)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--micro-batch-docs", type=int, default=worker.max_batch_docs)
    p.add_argument("--micro-batch-tokens", type=int, default=worker.max_batch_tokens)
    p.add_argument("--max-pass-tokens", type=int, default=worker.max_pass_tokens)
    p.add_argument("--max-chunk-tokens", type=int, default=worker.max_chunk_tokens)
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (also BENCH_QUICK=1)")
    p.add_argument("--crf", action="store_true", help="only the CRF decoders")
    p.add_argument("--crf-shapes", type=shapes_of, default=None, help="rows x tokens per pass")
    p.add_argument("--crf-micro-batches", type=int, default=5, help="corpus micro-batches")
    p.add_argument(
        "--crf-beside-network",
        action="store_true",
        help="a micro-batch's network runs on another thread meanwhile, as in the model process",
    )
    p.add_argument("--rounds", type=int, default=None, help="--crf: interleaved timing rounds")
    p.add_argument(
        "--out", default=None, help="JSON result (default: results/model.json; .out/crf.json)"
    )
    args = p.parse_args(argv)
    args.out = args.out or str(SCRATCH / "crf.json" if args.crf else RESULTS / "model.json")
    args.quick = quick_mode(args.quick)
    q = args.quick
    args.batch_sizes = args.batch_sizes or ([32, 128] if q else [32, 64, 128, 256])
    args.lengths = args.lengths or ([16, 64] if q else [16, 32, 64])
    args.repeats = args.repeats or (2 if q else 5)
    args.case_budget_s = args.case_budget_s or (5.0 if q else 20.0)
    args.corpus_docs = args.corpus_docs or (200 if q else 1000)
    if args.long_corpus_docs is None:
        # About as many tokens as the short corpus's 1000 documents.
        args.long_corpus_docs = 60 if q else 360
    args.crf_shapes = args.crf_shapes or CRF_SHAPES
    args.rounds = args.rounds or (3 if q else 15)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; use {', '.join(DTYPES)}")
    return args


# ------------------------------------------------------------------------------------ FLOPs


def flops_per_token(cfg: ModelConfig, mean_chars: float) -> dict:
    """Useful floating-point operations per real token (a multiply-add counts 2).

    LSTM: 4 gates x hidden x (input + hidden) multiply-adds per direction and layer; projection:
    (hidden x directions) x tags; character CNN: char_dim x 3 x filters per character of the word
    (or the character BiLSTM per character); CRF: Viterbi (add + max over K x K) and
    forward-backward (add, exp, sum over K x K, twice), about 10 K^2. Embedding look-ups and
    element-wise gate activations are not counted.
    """
    dirs = 2 if cfg.bidirectional else 1
    h = cfg.hidden
    in_dim = cfg.word_dim
    char = 0.0
    if cfg.arch == "bilstm-crf":
        if cfg.char_encoder == "cnn":
            in_dim += cfg.char_filters
            char = 2.0 * cfg.char_dim * 3 * cfg.char_filters * mean_chars
        elif cfg.char_encoder == "lstm":
            ch = cfg.char_filters // 2
            in_dim += 2 * ch
            char = 2 * 8.0 * ch * (cfg.char_dim + ch) * mean_chars
        if cfg.case_dim:
            in_dim += cfg.case_dim
    lstm = 0.0
    layer_in = in_dim
    for _ in range(cfg.layers):
        lstm += dirs * 8.0 * h * (layer_in + h)
        layer_in = h * dirs
    proj = 2.0 * h * dirs * cfg.num_tags
    crf = 10.0 * cfg.num_tags**2 if cfg.arch == "bilstm-crf" else 0.0
    return {
        "lstm": lstm,
        "projection": proj,
        "char_encoder": char,
        "crf": crf,
        "total": lstm + proj + char + crf,
        "lstm_input_dim": in_dim,
        "mean_chars_per_token": mean_chars,
    }


# ------------------------------------------------------------------------------------ timing


def time_matmul(n: int, dtype: str, repeats: int, budget_s: float) -> dict:
    """GFLOP/s of torch.mm at n x n; fewer samples when one product is slow (emulated bf16)."""
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(torch_dtype)
    b = torch.randn(n, n, generator=g).to(torch_dtype)
    flops = 2.0 * n**3
    # Warm-up of about half a second (thread pool, caches, clock), then samples of >= 0.2 s.
    warm_until = time.perf_counter() + 0.5
    one = None
    while one is None or time.perf_counter() < warm_until:
        t0 = time.perf_counter()
        torch.mm(a, b)
        one = time.perf_counter() - t0
    per = max(1, int(0.2 / max(one, 1e-6)))
    count = max(1, min(max(5, repeats), int(budget_s / max(one * per, 1e-6))))
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        for _ in range(per):
            torch.mm(a, b)
        samples.append((time.perf_counter() - t0) / per)
    s = summarize(samples)
    return {
        "n": n,
        "flops": flops,
        "seconds": s,
        "gflops": flops / s["median"] / 1e9,
        "gflops_best": flops / s["min"] / 1e9,
    }


# One unit of timed work: the passes of one micro-batch, each with its sentences, padded and run
# by the tagger's in-process runner (one forward pass per pass, then one CRF decoding for all).
Call = list[tuple[list[EncodedSentence], Pass]]


def tagger_at(model_path: Path, options: TaggerOptions, dtype: str) -> Tagger:
    """A tagger whose network runs at `dtype`, cast as the worker casts it.

    Cast here rather than through `TaggerOptions.precision`, which would also ask the model file
    for a dev-F1 measurement: the benchmark times any model.
    """
    tagger = Tagger.from_file(model_path, replace(options, precision="fp32"))
    if dtype != "fp32":
        cast_network(tagger.model, dtype)
    return tagger


def run_calls(tagger: Tagger, calls: list[Call]) -> None:
    for call in calls:
        batches = [pad_pass(sents, plan) for sents, plan in call]
        tagger.local(batches, [len(sents) for sents, _ in call])


def time_calls(tagger: Tagger, calls: list[Call], repeats: int, budget_s: float) -> dict:
    """Warm-up once, then `repeats` timed passes (fewer if one pass exceeds the budget share)."""
    t0 = time.perf_counter()
    run_calls(tagger, calls)  # warm-up (oneDNN primitives, allocator)
    first = time.perf_counter() - t0
    n = max(1, min(repeats, int(budget_s / max(first, 1e-6))))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        run_calls(tagger, calls)
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def run_batches(model, batches: list[Batch]) -> None:
    with torch.inference_mode():
        for b in batches:
            model.decode(b, with_scores=True)


def check_dtypes(model, batch: Batch) -> dict:
    """The dtypes seen at the LSTM output (the projection's input), the projection output, and
    the tags and confidences the CRF returns; seen through forward hooks, nothing patched."""
    seen: dict[str, str] = {}

    def name_of(t) -> str:
        return str(t.dtype).replace("torch.", "")

    handles = [
        model.proj.register_forward_pre_hook(
            lambda _mod, inp: seen.__setitem__("lstm_output", name_of(inp[0]))
        ),
        model.proj.register_forward_hook(
            lambda _mod, _inp, out: seen.__setitem__("projection_output", name_of(out))
        ),
    ]
    try:
        with torch.inference_mode():
            tags, scores = model.decode(batch, with_scores=True)
    finally:
        for h in handles:
            h.remove()
    seen["crf_tags"] = name_of(tags)
    if scores is not None:
        seen["crf_scores"] = name_of(scores)
    return seen


# ------------------------------------------------------------------------------------ batches


def token_stream(prepared: list[PreparedDoc]) -> list[str]:
    return [t.text for doc in prepared for window in doc.windows for t in window]


def shape_sentences(
    tagger: Tagger, words: list[str], b: int, t: int, offset: int
) -> list[EncodedSentence]:
    """B sequences of exactly T real tokens, cut from the corpus' token stream."""
    sents = []
    n = len(words)
    for i in range(b):
        start = (offset + i * t) % max(1, n - t)
        sents.append(tagger.vocabs.encode(words[start : start + t]))
    return sents


def micro_batches(prepared: list[PreparedDoc], max_docs: int, max_tokens: int):
    """The documents grouped as the worker's MicroBatcher groups them (no wait limit)."""
    batcher: MicroBatcher[PreparedDoc] = MicroBatcher(
        BatchLimits(max_docs=max_docs, max_tokens=max_tokens, max_wait_s=float("inf"))
    )
    for doc in prepared:
        if not batcher.fits(doc.num_tokens):
            yield batcher.take()
        batcher.add(doc, doc.num_tokens, 0.0)
        if batcher.due(0.0):
            yield batcher.take()
    if len(batcher):
        yield batcher.take()


def corpus_calls(tagger: Tagger, groups: list[list[PreparedDoc]], bucketed: bool):
    """The passes of each micro-batch, with and without length buckets, and their shapes."""
    calls: list[Call] = []
    shapes: list[tuple[int, int]] = []
    for docs in groups:
        sents = [enc for doc in docs for enc in doc.encoded if len(enc)]
        if not sents:
            continue
        sents.sort(key=len)
        if bucketed:
            # Exactly the Tagger's grouping: sorted by length, one pass per bucket, under its
            # budget of padded positions per pass.
            options = tagger.options
            passes = plan_passes([len(s) for s in sents], options.buckets, options.max_pass_tokens)
            calls.append([([sents[i] for i in p.sequences], p) for p in passes])
            shapes += [(p.rows, p.length) for p in passes]
        else:
            whole = Pass(list(range(len(sents))), len(sents[-1]), len(sents))
            calls.append([(sents, whole)])
            shapes.append((whole.rows, whole.length))
    return calls, shapes


def long_corpus(tagger: Tagger, args: argparse.Namespace, threads: int, budget: float) -> dict:
    """The long-article corpus (`corpus.py --kind long`) as the worker runs it: its micro-batches,
    length buckets on, fp32, `threads` torch threads. Tokens/s of real tokens."""
    docs = documents(args.long_corpus_docs, args.seed, kind="long")
    prepared = [tagger.prepare(d["text"]) for d in docs]
    groups = list(micro_batches(prepared, args.micro_batch_docs, args.micro_batch_tokens))
    calls, shapes = corpus_calls(tagger, groups, bucketed=True)
    real_tokens = sum(d.num_tokens for d in prepared)
    padded = sum(n * t for n, t in shapes)
    s = time_calls(tagger, calls, args.repeats, budget)
    tps = real_tokens / s["median"]
    log(f"long corpus fp32 buckets on {threads} thread(s) {tps:>10.0f} tok/s")
    return {
        "docs": len(prepared),
        "sequences": sum(1 for d in prepared for w in d.windows if w),
        "real_tokens": real_tokens,
        "micro_batches": len(groups),
        "threads": threads,
        "forward_passes": len(shapes),
        "padding_ratio": 1 - real_tokens / padded,
        "seconds": s,
        "tokens_per_s": tps,
    }


def text_path(tagger: Tagger, docs: list[dict], repeats: int) -> dict:
    """Tokens/s of `Tagger.prepare` (tokenize, split sentences, chunk, encode) on one core, for
    each `--line-breaks` mode, on the corpus as it is and hard-wrapped at 72 columns.
    """
    corpora = {
        "corpus": [d["text"] for d in docs],
        "wrapped at 72": [textwrap.fill(d["text"], 72) for d in docs],
    }
    options = tagger.options
    runs = []
    for name, texts in corpora.items():
        # The modes take turns, repeat after repeat, so that a slower stretch of the machine
        # weighs on all of them alike.
        samples: dict[str, list[float]] = {mode: [] for mode in LINE_BREAK_MODES}
        tokens = {}
        for repeat in range(repeats + 1):  # the first round warms up
            for mode in LINE_BREAK_MODES:
                tagger.options = replace(options, line_breaks=mode)
                t0 = time.perf_counter()
                n = sum(tagger.prepare(t).num_tokens for t in texts)
                if repeat:
                    samples[mode].append(time.perf_counter() - t0)
                tokens[mode] = n
        for mode in LINE_BREAK_MODES:
            s = summarize(samples[mode])
            runs.append({"texts": name, "line_breaks": mode, "tokens": tokens[mode],
                         "seconds": s, "tokens_per_s": tokens[mode] / s["median"]})  # fmt: skip
            log(f"text path, {name}, --line-breaks {mode}: {runs[-1]['tokens_per_s']:>10.0f} tok/s")
    tagger.options = options
    return {"docs": len(docs), "runs": runs}


# ------------------------------------------------------------------------------------ CRF


def _decode_torch(tagger: Tagger, em: torch.Tensor, mask: torch.Tensor):
    with torch.inference_mode():
        tags, scores = tagger.model.decode_emissions(em, mask, with_scores=True)
    return tags.numpy(), scores.numpy()


# Each CRF decoder as the CPU worker calls it (`LocalRunner.decode`): emissions [N, T, K] and mask
# [N, T] on the CPU in, numpy tags and scores out. Until the CRF had one decoder there was a
# numpy one beside the torch one (see docs/benchmarks.md).
CRF_DECODERS = {"torch": _decode_torch}


def crf_cases(
    tagger: Tagger, prepared: list[PreparedDoc], args: argparse.Namespace
) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], Callable[[], object]]:
    """The network's emissions and masks to decode, by case name, and one micro-batch's network.

    One pass per `--crf-shapes` (rows x tokens), its rows cut from the corpus' token stream with
    lengths in (3/4 T, T], as a length bucket holds them; and "micro-batches": the first corpus
    micro-batches, each one decoding of all its length buckets joined, as `LocalRunner.decode`
    gets it.
    """
    rng = random.Random(args.seed)
    words = token_stream(prepared)
    cases = {}
    for b, t in args.crf_shapes:
        lengths = [rng.randint(max(1, t - t // 4 + 1), t) for _ in range(b)]
        sents = [
            tagger.vocabs.encode(words[start : start + n])
            for n in lengths
            for start in [rng.randrange(max(1, len(words) - n))]
        ]
        e = tagger.local.run_network([pad_batch(sents, t)], [b])
        cases[f"{b} x {t}"] = [(e.scores.float().contiguous(), e.mask)]
    groups = list(micro_batches(prepared, args.micro_batch_docs, args.micro_batch_tokens))
    calls, _ = corpus_calls(tagger, groups[: args.crf_micro_batches], bucketed=True)
    joined, networks = [], []
    for call in calls:
        batches = [pad_pass(sents, plan) for sents, plan in call]
        networks.append(partial(tagger.local.run_network, batches, [len(g) for g, _ in call]))
        e = networks[-1]()
        joined.append((e.scores.float().contiguous(), e.mask))
    rows = sum(len(m) for _, m in joined) / len(joined)
    cases[f"{len(joined)} micro-batches (~{rows:.0f} rows)"] = joined
    return cases, networks[0]


def crf_decoders(tagger: Tagger, prepared: list[PreparedDoc], args: argparse.Namespace) -> dict:
    """Seconds per case of each CRF decoder, on the emissions of typical passes (`crf_cases`).

    Rounds interleave the decoders (their order alternating from round to round) so that a slower
    stretch of a shared machine weighs on both alike; each sample is the mean of enough calls to
    last about 20 ms. Reported: the median per decoder and case, and each decoder's median over
    the first one's.
    """
    cases, network = crf_cases(tagger, prepared, args)
    names = list(CRF_DECODERS)
    stop = threading.Event()
    network_passes = [0]

    def network_loop() -> None:
        while not stop.is_set():
            network()
            network_passes[0] += 1

    beside = threading.Thread(target=network_loop, daemon=True)
    if args.crf_beside_network:
        # As in the model process: the network runs the next pass on another thread while the
        # CRF decodes, and the two hand the GIL back and forth at the child's switch interval.
        sys.setswitchinterval(0.0005)
        beside.start()

    def run(name: str, passes) -> list:
        return [CRF_DECODERS[name](tagger, em, mask) for em, mask in passes]

    calls = {}
    for case, passes in cases.items():
        outputs = []
        for name in names:
            t0 = time.perf_counter()
            outputs.append(run(name, passes))  # also the warm-up
            calls[(case, name)] = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
        # Each other decoder's (tags, scores) against the first one's, pass by pass.
        pairs = [(x, y) for out in outputs[1:] for x, y in zip(out, outputs[0], strict=True)]
        same = all((x[0] == y[0]).all() for x, y in pairs)
        gap = max([float(abs(x[1] - y[1]).max()) for x, y in pairs] or [0.0])
        if pairs:
            log(f"CRF {case}: decoders agree on tags: {same}, largest score gap {gap:.1e}")
    samples: dict = {key: [] for key in calls}
    try:
        for r in range(args.rounds):
            for case, passes in cases.items():
                for name in names if r % 2 == 0 else names[::-1]:
                    n = calls[(case, name)]
                    t0 = time.perf_counter()
                    for _ in range(n):
                        run(name, passes)
                    samples[(case, name)].append((time.perf_counter() - t0) / n)
    finally:
        stop.set()
        if beside.is_alive():
            beside.join()
            log(f"network passes run beside the decoders: {network_passes[0]}")
    rows = []
    for case in cases:
        row: dict = {"case": case}
        for name in names:
            row[name] = summarize(samples[(case, name)])
        base = row[names[0]]["median"]
        row["ratio_to_" + names[0]] = {name: row[name]["median"] / base for name in names[1:]}
        rows.append(row)
        shown = "  ".join(f"{name} {row[name]['median'] * 1e3:7.2f} ms" for name in names)
        ratios = "  ".join(
            f"{name}/{names[0]} {v:.2f}" for name, v in row["ratio_to_" + names[0]].items()
        )
        log(f"CRF {case:<28} {shown}  {ratios}")
    return {
        "num_tags": tagger.info.config.num_tags,
        "rounds": args.rounds,
        "beside_network": args.crf_beside_network,
        "network_passes_beside": network_passes[0],
        "cases": rows,
    }


def crf_main(args: argparse.Namespace, model_path: Path) -> int:
    options = TaggerOptions(device="cpu", precision="fp32")
    tagger = Tagger.from_file(model_path, options)
    if tagger.model.crf is None:
        log(f"{display_path(model_path)} has no CRF")
        return 1
    docs = documents(args.corpus_docs, args.seed)
    prepared = [tagger.prepare(d["text"]) for d in docs]
    log(
        f"CRF decoders: {display_path(model_path)}, K = {tagger.info.config.num_tags}, "
        f"{torch.get_num_threads()} torch threads, {args.rounds} rounds"
        + (", the network running beside" if args.crf_beside_network else "")
    )
    result = {
        "benchmark": "crf_decoders",
        "host": host_info(),
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "model": display_path(model_path),
        "crf": crf_decoders(tagger, prepared, args),
    }
    result["host"]["load_average_after"] = host_info()["load_average"]
    write_json(args.out, result)
    return 0


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model_path = Path(args.model) if args.model else default_model_path()
    if args.crf:
        return crf_main(args, model_path)
    log(f"model core: {display_path(model_path)}, {threads} torch threads")
    options = TaggerOptions(
        device="cpu",
        max_chunk_tokens=args.max_chunk_tokens,
        max_pass_tokens=args.max_pass_tokens,
    )
    tagger = tagger_at(model_path, options, "fp32")
    native_bf16 = cpu_has_native_bf16()
    cfg = tagger.info.config

    docs = documents(args.corpus_docs, args.seed)
    prepared = [tagger.prepare(d["text"]) for d in docs]
    words = token_stream(prepared)
    mean_chars = statistics.fmean(len(w) for w in words)
    fpt = flops_per_token(cfg, mean_chars)

    result: dict = {
        "benchmark": "model_core",
        "mode": "quick" if args.quick else "full",
        "host": host_info(),
        "torch": {
            "version": torch.__version__,
            "threads": threads,
            "mkldnn": torch.backends.mkldnn.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": native_bf16,
        },
        "model": {
            "file": display_path(model_path),
            "name": tagger.name,
            "version": tagger.version,
            "config": cfg.to_dict(),
            "flops_per_token": fpt,
        },
        "settings": {
            "repeats": args.repeats,
            "case_budget_s": args.case_budget_s,
            "corpus_docs": args.corpus_docs,
            "long_corpus_docs": args.long_corpus_docs,
            "seed": args.seed,
            "micro_batch_docs": args.micro_batch_docs,
            "micro_batch_tokens": args.micro_batch_tokens,
            "max_pass_tokens": args.max_pass_tokens,
            "max_chunk_tokens": args.max_chunk_tokens,
            "buckets": list(tagger.options.buckets),
            "with_scores": True,
        },
    }

    # 1. matmul peak
    matmul = {}
    for dtype in args.dtypes:
        log(f"matmul {args.matmul_size}^3 {dtype}")
        matmul[dtype] = time_matmul(args.matmul_size, dtype, args.repeats, args.case_budget_s / 2)
        log(f"  {matmul[dtype]['gflops']:.1f} GFLOP/s")
    result["matmul"] = matmul

    # Each precision's tagger: does it run at all, and in which dtype does the CRF run?
    probe = pad_batch(shape_sentences(tagger, words, 8, 16, 0))
    taggers = {"fp32": tagger}
    precision: dict = {}
    usable = []
    for dtype in args.dtypes:
        try:
            taggers[dtype] = tagger_at(model_path, options, dtype)
            seen = check_dtypes(taggers[dtype].model, probe)
            emulated = dtype != "fp32" and not native_bf16
            precision[dtype] = {"supported": True, "emulated": emulated, "dtypes_seen": seen}
            usable.append(dtype)
        except Exception as e:  # noqa: BLE001 - any failure means "unsupported here"
            msg = " ".join(str(e).split())[:400]
            precision[dtype] = {"supported": False, "error": f"{type(e).__name__}: {msg}"}
            log(f"{dtype} does not run on this machine: {precision[dtype]['error']}")
    result["precision"] = precision

    # 2. shapes
    shapes = []
    for dtype in usable:
        grid = [(b, t) for b in args.batch_sizes for t in args.lengths]
        if precision[dtype].get("emulated"):
            # Emulated bf16 runs several times slower than fp32: one shape shows how much.
            grid = [(max(args.batch_sizes), sorted(args.lengths)[len(args.lengths) // 2])]
        for b, t in grid:
            sents = shape_sentences(tagger, words, b, t, offset=b * 7 + t)
            calls: list[Call] = [[(sents, Pass(list(range(b)), t, b))]]
            s = time_calls(taggers[dtype], calls, args.repeats, args.case_budget_s)
            tps = b * t / s["median"]
            row = {
                "dtype": dtype,
                "batch": b,
                "length": t,
                "tokens": b * t,
                "seconds": s,
                "tokens_per_s": tps,
                "model_gflops": tps * fpt["total"] / 1e9,
            }
            # An emulated dtype's matmul is no ceiling of anything: no ratio.
            emulated = precision[dtype].get("emulated")
            eff = None if emulated else row["model_gflops"] / matmul[dtype]["gflops"]
            row["efficiency_vs_matmul"] = eff
            shapes.append(row)
            shown = "n/a" if eff is None else f"{eff:.1%}"
            log(f"{dtype} B={b:<4} T={t:<3} {tps:>10.0f} tok/s  eff {shown}")
    result["shapes"] = shapes

    # 3. corpus, buckets on and off
    groups = list(micro_batches(prepared, args.micro_batch_docs, args.micro_batch_tokens))
    real_tokens = sum(d.num_tokens for d in prepared)
    corpus: dict = {
        "docs": len(prepared),
        "sequences": sum(1 for d in prepared for w in d.windows if w),
        "real_tokens": real_tokens,
        "micro_batches": len(groups),
        "runs": [],
    }
    budget = args.case_budget_s * 3
    cases = [("fp32", True, threads), ("fp32", False, threads)]
    cases += [(d, True, threads) for d in usable if d != "fp32"]
    if threads > 1:
        # The worker gives the model every core but one: the same case on one thread, for
        # comparing end to end with the model as the worker runs it.
        cases.append(("fp32", True, 1))
    for dtype, bucketed, case_threads in cases:
        if dtype not in usable:
            continue
        calls, batch_shapes = corpus_calls(tagger, groups, bucketed)
        padded = sum(n * t for n, t in batch_shapes)
        torch.set_num_threads(case_threads)
        s = time_calls(taggers[dtype], calls, args.repeats, budget)
        torch.set_num_threads(threads)
        tps = real_tokens / s["median"]
        run = {
            "dtype": dtype,
            "threads": case_threads,
            "buckets": bucketed,
            "forward_passes": len(batch_shapes),
            "padded_tokens": padded,
            "padding_ratio": 1 - real_tokens / padded,
            "seconds": s,
            "tokens_per_s": tps,
            "model_gflops": tps * fpt["total"] / 1e9,
        }
        # The matmul figure is for the run's thread count and a native dtype: no ratio otherwise.
        same = case_threads == threads and not precision[dtype].get("emulated")
        eff_value = run["model_gflops"] / matmul[dtype]["gflops"]
        run["efficiency_vs_matmul"] = eff_value if same else None
        corpus["runs"].append(run)
        mode = "on " if bucketed else "off"
        pad, eff = run["padding_ratio"], run["efficiency_vs_matmul"]
        log(
            f"corpus {dtype} buckets {mode} {case_threads} thread(s) {tps:>10.0f} tok/s  "
            f"padding {pad:.1%}  eff {'n/a' if eff is None else f'{eff:.1%}'}"
        )
    result["corpus"] = corpus
    if args.long_corpus_docs > 0:
        result["long_corpus"] = long_corpus(tagger, args, threads, budget)
    result["text_path"] = text_path(tagger, docs, args.repeats)

    fp32 = [r for r in corpus["runs"] if r["dtype"] == "fp32"]
    on = next((r for r in fp32 if r["buckets"] and r["threads"] == threads), None)
    off = next((r for r in fp32 if not r["buckets"]), None)
    one = next((r for r in fp32 if r["buckets"] and r["threads"] == 1), None)
    result["summary"] = {
        "tokens_per_s_bucketed_fp32": on and on["tokens_per_s"],
        "tokens_per_s_bucketed_fp32_one_thread": one and one["tokens_per_s"],
        "tokens_per_s_unbucketed_fp32": off and off["tokens_per_s"],
        "tokens_per_s_bucketed_fp32_long": (result.get("long_corpus") or {}).get("tokens_per_s"),
        "bucketing_speedup": on and off and on["tokens_per_s"] / off["tokens_per_s"],
        "efficiency_bucketed_fp32": on and on["efficiency_vs_matmul"],
        "matmul_gflops_fp32": matmul.get("fp32", {}).get("gflops"),
        "bf16_supported": precision.get("bf16", {}).get("supported"),
    }
    result["host"]["load_average_after"] = host_info()["load_average"]
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
