"""The collector settings of a process that tags (`ner_stream.heap`)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from click.testing import CliRunner

from ner_stream import heap
from ner_stream.checkpoint import save
from ner_stream.cli import main, tune_interpreter
from tests.fakes import rigged_model

SETTLED = (heap.YOUNG_THRESHOLD, *heap.OLDER_THRESHOLDS)


def test_settle_freezes_the_heap_and_spaces_collections_out() -> None:
    # In a fresh interpreter: settling changes the collector of the whole process.
    script = (
        "import gc, json\n"
        "from ner_stream import heap\n"
        "before = gc.get_freeze_count()\n"
        "heap.settle()\n"
        "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, frozen, thresholds = json.loads(out.stdout)
    assert before == 0 and frozen > 1000  # the imported modules' objects, at least
    assert tuple(thresholds) == SETTLED
    assert heap.YOUNG_THRESHOLD > 700  # CPython's default, which the module exists to raise


def test_the_worker_settles_its_heap() -> None:
    tune_interpreter()  # the conftest fixture puts the settings back
    assert gc.get_threshold() == SETTLED
    assert gc.get_freeze_count() > 0
    assert sys.getswitchinterval() < 0.005


def test_tag_settles_its_heap(tmp_path) -> None:
    path = tmp_path / "rigged.nerm"
    loaded = rigged_model()
    save(path, loaded.model, loaded.info)
    result = CliRunner().invoke(main, ["tag", "--model", str(path), "--device", "cpu"],
                                input=b"Peter went to Paris\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Peter" in result.stdout
    assert gc.get_threshold() == SETTLED
