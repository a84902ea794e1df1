"""(d) GPU: the model core on a CUDA device, and where the bottleneck moves.

One script, sized to run in a few minutes on one GPU, that needs only torch and numpy (no Kafka
client, no broker):

1. device and ceilings: GPU name, torch/CUDA versions, dense matmul TFLOP/s (fp32, tf32, bf16);
2. agreement: the same corpus tagged on the CPU and on the GPU (entities compared one by one);
3. shapes: `NerModel.decode` on full batches of B sequences x T tokens, B = 256 ... 4096, in
   fp32, bf16 and fp16 (the network cast as the worker's `--precision` casts it, the CRF in
   fp32), timed with CUDA synchronisation, with and without the CRF;
4. tagger: the corpus through `Tagger._forward` (host padding, copies, one forward pass per length
   bucket, CRF decoding, results back as lists) at micro-batches of 128 ... 4096 documents;
5. host stages on one CPU core of the same machine: JSON decode of the input records,
   tokenization + encoding (`Tagger.prepare`), span decoding and output JSON, in tokens/s. GPU
   tokens/s over these gives the host processes (consumers) one GPU can keep busy.

    python -m benchmarks.bench_gpu --out benchmarks/results/gpu.json [--budget-s 240]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, display_path, host_info, log, write_json
from benchmarks.corpus import DEFAULT_SEED, documents
from ner_stream.batching import pad_batch
from ner_stream.checkpoint import default_model_path
from ner_stream.messages import Source, decode, encode_output
from ner_stream.precision import cast_network
from ner_stream.tagger import Tagger, TaggerOptions

PRECISIONS = ("fp32", "bf16", "fp16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU model-core benchmark (needs CUDA).")
    p.add_argument("--model", default=None, help="model file (default: the packaged model)")
    p.add_argument("--docs", type=int, default=6000, help="corpus documents")
    p.add_argument("--batch-sizes", default="256,512,1024,2048,4096")
    p.add_argument("--lengths", default="16,32,64")
    p.add_argument("--micro-batches", default="128,512,1024,4096", help="documents per call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=240.0, help="soft limit for the whole run")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    p.add_argument("--device", default="cuda", help="cpu only to try the script out")
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> dict:
    """Median seconds of `fn()` after one warm-up call, synchronising the device around each."""
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return {"median": statistics.median(samples), "min": min(samples), "n": len(samples)}


def matmul_tflops(device: str, dtype: torch.dtype, tf32: bool = False) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    n = 8192 if device == "cuda" else 512
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    s = timed(lambda: torch.mm(a, b), 10)
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * n**3 / s["median"] / 1e12


def agreement(cpu: Tagger, gpu: Tagger, texts: list[str]) -> dict:
    """Entities of the CPU and GPU taggers compared (same spans and types; score difference)."""
    a = cpu.tag(texts)
    b = gpu.tag(texts)
    same = differ = 0
    score_diff = 0.0
    for ea, eb in zip(a, b, strict=True):
        ka = {(e.start, e.end, e.type): e.score for e in ea}
        kb = {(e.start, e.end, e.type): e.score for e in eb}
        same += len(ka.keys() & kb.keys())
        differ += len(ka.keys() ^ kb.keys())
        for k in ka.keys() & kb.keys():
            score_diff = max(score_diff, abs(ka[k] - kb[k]))
    return {"docs": len(texts), "entities_same": same, "entities_differ": differ,
            "max_score_diff": score_diff}  # fmt: skip


def shape_rows(tagger: Tagger, words: list[str], b: int, t: int):
    """B sequences of exactly T real tokens, cut from the corpus' token stream."""
    starts = [(i * t) % (len(words) - t) for i in range(b)]
    return [tagger.vocabs.encode(words[k : k + t]) for k in starts]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    started = time.perf_counter()
    model_path = Path(args.model) if args.model else default_model_path()
    name = torch.cuda.get_device_properties(0).name if device == "cuda" else "cpu"
    result: dict = {
        "benchmark": "gpu",
        "host": host_info(),
        "device": {
            "name": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        },
        "model": display_path(model_path),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result["device"]["multiprocessors"] = props.multi_processor_count
        result["device"]["memory_gib"] = props.total_memory / 2**30
    log(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    result["matmul_tflops"] = {
        "fp32": matmul_tflops(device, torch.float32),
        "tf32": matmul_tflops(device, torch.float32, tf32=True),
        "bf16": matmul_tflops(device, torch.bfloat16),
    }
    log(f"matmul TFLOP/s: {result['matmul_tflops']}")

    texts = [d["text"] for d in documents(args.docs, DEFAULT_SEED)]
    torch.set_num_threads(1)
    cpu = Tagger.from_file(model_path, TaggerOptions(device="cpu"))
    gpu = Tagger.from_file(model_path, TaggerOptions(device=device, max_pass_tokens=1 << 20))
    result["agreement"] = agreement(cpu, gpu, texts[:300])
    log(f"agreement CPU vs GPU: {result['agreement']}")

    # Host stages, one core: what one consumer process can feed the GPU.
    records = [
        json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False).encode()
        for i, t in enumerate(texts)
    ]
    src = Source("in", 0, 0)
    t0 = time.perf_counter()
    docs = [decode(r, None, src, 1 << 20) for r in records]
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = [gpu.prepare(d.text) for d in docs]
    t_prepare = time.perf_counter() - t0
    tokens = sum(p.num_tokens for p in prepared)
    sample = 200
    entities, _ = cpu.tag_prepared(prepared[:sample])  # something to encode; not timed
    t0 = time.perf_counter()
    for d, e in zip(docs[:sample], entities, strict=True):
        encode_output(d, e, gpu.name, gpu.version)
    t_encode = (time.perf_counter() - t0) * len(docs) / sample
    host = {
        "docs": len(docs),
        "tokens": tokens,
        "decode_input_s": t_decode,
        "prepare_s": t_prepare,
        "encode_output_s": t_encode,
    }
    host["tokens_per_s_one_core"] = tokens / (t_decode + t_prepare + t_encode)
    result["host_stages"] = host
    log(f"host stages, one core: {host['tokens_per_s_one_core']:.0f} tokens/s")

    # Shapes: model.decode on device tensors.
    words = [t.text for p in prepared for c in p.chunks for t in c]
    models = {p: cast_network(copy.deepcopy(gpu.model), p) for p in PRECISIONS}
    shapes = []
    for t in ints(args.lengths):
        for b in ints(args.batch_sizes):
            if time.perf_counter() - started > args.budget_s * 0.6:
                break
            batch = pad_batch(shape_rows(gpu, words, b, t)).to(gpu.device)
            for dtype, model in models.items():

                def full(model=model, batch=batch):
                    with torch.inference_mode():
                        model.decode(batch, with_scores=True)

                def network(model=model, batch=batch):
                    with torch.inference_mode():
                        model.emissions(batch)

                try:
                    s_full = timed(full, args.repeats)
                    s_net = timed(network, args.repeats)
                except RuntimeError as e:
                    shapes.append({"dtype": dtype, "batch": b, "length": t, "error": str(e)[:200]})
                    continue
                row = {
                    "dtype": dtype,
                    "batch": b,
                    "length": t,
                    "tokens_per_s": b * t / s_full["median"],
                    "network_tokens_per_s": b * t / s_net["median"],
                    "crf_share": 1 - s_net["median"] / s_full["median"],
                }
                shapes.append(row)
                log(
                    f"{dtype} B={b} T={t}: {row['tokens_per_s']:,.0f} tok/s "
                    f"(network alone {row['network_tokens_per_s']:,.0f}; "
                    f"CRF {row['crf_share']:.0%})"
                )
    result["shapes"] = shapes

    # The tagger's own path over the corpus, at several micro-batch sizes.
    sizes = ints(args.micro_batches)
    tagger_runs = []
    for size in sizes:
        if time.perf_counter() - started > args.budget_s * 0.9:
            break
        groups = [prepared[i : i + size] for i in range(0, len(prepared), size)]
        s = timed(lambda groups=groups: [gpu.tag_prepared(g) for g in groups], 2)
        # One more pass for the split between the model (padding, copies, network, CRF, results
        # back to lists) and span decoding into entities, both on the host thread.
        stats = [gpu.tag_prepared(g)[1] for g in groups]
        run = {
            "docs_per_call": size,
            "tokens_per_s": tokens / s["median"],
            "seconds": s["median"],
            "model_s": sum(st.inference_s for st in stats),
            "spans_s": sum(st.spans_s for st in stats),
        }
        tagger_runs.append(run)
        log(
            f"tagger, {size} docs per call: {run['tokens_per_s']:,.0f} tok/s "
            f"(model {run['model_s']:.2f} s, spans {run['spans_s']:.2f} s)"
        )
    result["tagger"] = tagger_runs
    best = max((r["tokens_per_s"] for r in tagger_runs), default=None)
    result["consumer_processes_per_gpu"] = best and best / host["tokens_per_s_one_core"]
    result["wall_s"] = time.perf_counter() - started
    write_json(args.out, result)
    log(
        f"best tagger rate {best:,.0f} tok/s; one host core feeds "
        f"{host['tokens_per_s_one_core']:,.0f} tok/s -> "
        f"{result['consumer_processes_per_gpu']:.1f} consumer processes per GPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
