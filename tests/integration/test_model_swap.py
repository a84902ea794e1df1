"""Hot model swap end to end: `ner-stream run --model FILE` (a real subprocess, its model in a
model process) against the real broker, with FILE replaced mid-stream by a new version of the
model, then by garbage."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import urllib.request
from collections import Counter

import pytest

from tests.integration import worker_util as wu
from tests.integration.test_worker import (  # noqa: F401 (fixtures)
    OUTPUT_TIMEOUT_S,
    _stop,
    _wait_assigned,
    make_topics,
    start_worker,
    tiny_model,
)

pytestmark = pytest.mark.integration

RATE_PER_S = 200
AFTER_SWAP = 200  # documents produced after the swap before the stream stops
SWAP_TIMEOUT_S = 60  # two polls, loading, a new model process, a smoke tag: on a busy machine


class Feeder(threading.Thread):
    """Produces valid documents doc-0, doc-1, ... to `topic` at about `rate_per_s` until
    `finish`, which returns how many were sent (every send acknowledged)."""

    def __init__(self, bootstrap: str, topic: str, rate_per_s: float) -> None:
        super().__init__(daemon=True, name="test-feeder")
        self.bootstrap, self.topic, self.rate_per_s = bootstrap, topic, rate_per_s
        self.sent = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        producer = wu.make_producer(self.bootstrap)
        futures = []
        try:
            t0 = time.monotonic()
            while not self._stop_event.is_set():
                ids = [f"doc-{i}" for i in range(self.sent, self.sent + 10)]
                for key, value, headers in wu.doc_records(ids):
                    futures.append(producer.send(self.topic, key=key, value=value,
                                                 headers=headers))  # fmt: skip
                self.sent += len(ids)
                ahead = t0 + self.sent / self.rate_per_s - time.monotonic()
                if ahead > 0:
                    self._stop_event.wait(ahead)
            producer.flush(timeout=30)
            for future in futures:
                future.get(timeout=1)  # re-raises a failed send instead of losing it
        except BaseException as e:
            self.error = e
        finally:
            producer.close(timeout=10)

    def finish(self) -> int:
        self._stop_event.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        return self.sent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _swaps(text: str, result: str) -> float:
    found = re.search(rf'^ner_stream_model_swaps_total\{{result="{result}"\}} (\S+)$', text,
                      re.MULTILINE)  # fmt: skip
    return float(found.group(1)) if found else 0.0


def _versions_in_input_order(records: list[wu.Record]) -> list[str]:
    outputs = sorted((r.json() for r in records), key=lambda o: o["source"]["offset"])
    assert {o["source"]["partition"] for o in outputs} == {0}
    return [o["model"]["version"] for o in outputs]


def test_a_model_file_replaced_mid_stream_is_swapped_in_and_a_corrupt_one_refused(
    kafka_bootstrap,
    make_topics,  # noqa: F811
    start_worker,  # noqa: F811
    tmp_path,
):
    model = wu.build_tiny_model(tmp_path / "tiny.nerm", version="0.0.1")
    topics = make_topics(partitions=1)
    port = _free_port()
    worker = start_worker("swap", topics, model=str(model), model_watch_s=0.2, metrics_port=port)
    _wait_assigned(worker)
    feeder = Feeder(kafka_bootstrap, topics.input, RATE_PER_S)
    feeder.start()
    with wu.TopicReader(kafka_bootstrap, topics.output, json_ids=True) as reader:
        wu.wait_for(lambda: len(reader.ids) >= 200, OUTPUT_TIMEOUT_S, "outputs of 0.0.1",
                    [worker], tick=reader.poll)  # fmt: skip

        # The new version beside the file under a temporary name, then renamed over it.
        new = wu.build_tiny_model(tmp_path / "tiny.nerm.new", version="0.0.2")
        os.replace(new, model)
        wu.wait_for(lambda: "model swapped: now serving tiny-random 0.0.2" in worker.log(),
                    SWAP_TIMEOUT_S, "the swap", [worker], tick=reader.poll)  # fmt: skip
        sent_at_swap = feeder.sent
        wu.wait_for(lambda: feeder.sent >= sent_at_swap + AFTER_SWAP, 60, "more documents",
                    [worker], tick=reader.poll)  # fmt: skip
        ids = [f"doc-{i}" for i in range(feeder.finish())]
        wu.wait_for(lambda: len(reader.ids) >= len(ids), OUTPUT_TIMEOUT_S,
                    wu.ids_progress(reader, ids), [worker], tick=reader.poll)  # fmt: skip
        records = list(reader.read_to_end())

        assert set(reader.ids) == set(ids)
        assert Counter(reader.ids.values()) == Counter({1: len(ids)}), "duplicate outputs"
        versions = _versions_in_input_order(records)
        switch = versions.index("0.0.2")
        assert 0 < switch < len(versions) - AFTER_SWAP // 2, "the swap was not mid-stream"
        assert versions == ["0.0.1"] * switch + ["0.0.2"] * (len(versions) - switch), (
            "the outputs must switch models once, in input order"
        )
        assert all(r.json()["model"]["name"] == "tiny-random" for r in records)

        # Garbage in its place: refused, and the worker goes on with 0.0.2.
        garbage = tmp_path / "tiny.nerm.bad"
        garbage.write_bytes(b"\x00\x01 not a model \xfe\xff" * 1000)
        os.replace(garbage, model)
        refusal = f"model swap refused: {model}: "
        wu.wait_for(lambda: refusal in worker.log(), SWAP_TIMEOUT_S, "the refusal", [worker])
        late = [f"doc-{i}" for i in range(len(ids), len(ids) + 50)]
        wu.produce_records(kafka_bootstrap, topics.input, wu.doc_records(late))
        wu.wait_for(lambda: len(reader.ids) >= len(ids) + len(late), OUTPUT_TIMEOUT_S,
                    wu.ids_progress(reader, ids + late), [worker], tick=reader.poll)  # fmt: skip
        late_records = reader.read_to_end()[len(records) :]

    assert worker.alive()
    assert {r.json()["id"] for r in late_records} == set(late)
    assert {r.json()["model"]["version"] for r in late_records} == {"0.0.2"}
    text = _metrics(port)
    assert _swaps(text, "refused") == 1
    assert _swaps(text, "swapped") == 1
    assert 'version="0.0.2"' in re.search(r"^ner_stream_model_info\{.*$", text, re.M).group(0)
    log = worker.log()
    (line,) = [line for line in log.splitlines() if "model swap refused" in line]
    assert line.endswith("not a zip archive; still serving tiny-random 0.0.2"), line
    assert log.count("model swapped:") == 1
    _stop(worker)
