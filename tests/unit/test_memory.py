"""The model's memory and oneDNN's kernel cache (docs/operations.md, "Memory")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"

# Runs in a fresh interpreter: the setting is read once, at the first tensor operation.
PASSES = (
    f"SETTING = {ONEDNN_CACHE_ENV!r}"
    + """
import json, os, random, torch
from ner_stream.checkpoint import default_model_path, load
from ner_stream.model import Batch
from ner_stream.runner import LocalRunner

def rss_mib():
    # Anonymous memory only: the kernels' memory is there, while the file-backed part of RSS
    # moves with which pages of torch's libraries happen to be read in.
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024

torch.set_num_threads(1)
loaded = load(default_model_path())
runner = LocalRunner(loaded.model, torch.device("cpu"), "fp32")
words, chars = len(loaded.info.vocabs.words), len(loaded.info.vocabs.chars)
shapes = [(b, t) for b in range(1, 129, 3) for t in (8, 16, 24, 32, 48, 64)]
random.Random(0).shuffle(shapes)
shapes.insert(0, (128, 64))  # the largest first: the working set is reached at once
rss = []
for i, (b, t) in enumerate(shapes):
    batch = Batch(torch.randint(2, words, (b, t)), torch.randint(2, chars, (b, t, 8)),
                  torch.randint(0, 4, (b, t)), torch.ones(b, t, dtype=torch.bool))
    runner.decode(runner.run_network([batch], [b]))
    if i in (0, len(shapes) - 1):
        rss.append(rss_mib())
print(json.dumps({"rss": rss, "shapes": len(shapes), "setting": os.environ.get(SETTING)}))
"""
)


def _passes(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_ENV}
    if env_value is not None:
        env[ONEDNN_CACHE_ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PASSES], env=env, capture_output=True,
                         text=True, check=True, timeout=300)  # fmt: skip
    return json.loads(out.stdout)


def test_without_the_kernel_cache_memory_stays_flat_over_hundreds_of_new_shapes():
    # What the operations guide tells a user with a tight memory limit to set.
    result = _passes("0")
    before, after = result["rss"]
    assert after - before < 20, result
