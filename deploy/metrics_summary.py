"""Summarise a worker's Prometheus metrics for the demo: `metrics_summary.py URL`."""

import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    samples: dict[tuple[str, tuple], float] = {}
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def total(name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))

    docs_ok = total("ner_stream_documents_total", outcome="ok")
    dead = total("ner_stream_documents_total", outcome="dead_letter")
    tokens = total("ner_stream_tokens_total")
    batches = total("ner_stream_batches_total")
    infer = total("ner_stream_stage_seconds_sum", stage="inference")
    e2e_n = total("ner_stream_end_to_end_seconds_count")
    e2e = total("ner_stream_end_to_end_seconds_sum") / e2e_n if e2e_n else 0.0
    print(f"documents: {docs_ok:.0f} ok, {dead:.0f} dead letters; tokens: {tokens:.0f}")
    print(f"forward passes: {batches:.0f}, inference time: {infer:.2f} s"
          + (f" ({tokens / infer:.0f} tokens/s)" if infer else ""))  # fmt: skip
    print(f"mean end-to-end latency: {e2e * 1000:.0f} ms over {e2e_n:.0f} documents")
    types = {
        dict(lab)["type"]: v
        for (n, lab), v in samples.items()
        if n == "ner_stream_entities_total" and lab
    }
    print("entities: " + ", ".join(f"{t} {v:.0f}" for t, v in sorted(types.items())))


if __name__ == "__main__":
    main()
