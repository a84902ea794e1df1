"""Choosing the network's precision: only where the hardware runs it and the dev F1 allows."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ner_stream import precision as prec
from ner_stream.checkpoint import load, save
from ner_stream.cli import main as ner_stream_main
from ner_stream.precision import (
    Choice,
    PrecisionCheck,
    PrecisionError,
    checks_of,
    choose,
    with_check,
)
from ner_stream.tagger import Tagger, TaggerOptions
from tests.fakes import random_model

CPU = torch.device("cpu")
ALLOWED = 0.1  # dev-F1 points: `choose` has no default, every caller passes one
TEXTS = [
    "Peter went to Paris and the Peter went .",
    "paris peter to the and went Peter Paris .",
    "Peter Peter Paris went to the Paris .",
]


def check(precision: str = "bf16", f1: float = 90.03, fp32_f1: float = 90.0) -> PrecisionCheck:
    return PrecisionCheck(precision, f1, fp32_f1, "dev.txt", "ab" * 32, 100, "cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)


def test_auto_takes_bf16_on_a_cpu_with_native_bf16_when_dev_f1_allows(native_bf16):
    choice = choose("auto", CPU, {"bf16": check()}, ALLOWED)
    assert choice.precision == "bf16" and not choice.emulated
    assert "90.00" in choice.reason and "90.03" in choice.reason


def test_auto_stays_fp32_without_native_bf16(no_native_bf16):
    choice = choose("auto", CPU, {"bf16": check()}, ALLOWED)
    assert choice.precision == "fp32"
    assert "no native bf16" in choice.reason


@pytest.mark.parametrize("checks", [{}, {"bf16": check(f1=89.8)}, {"bf16": check(f1=90.2)}])
def test_auto_stays_fp32_when_the_model_has_no_check_or_f1_moved_too_much(native_bf16, checks):
    # A gain counts as a move too: the gate is on how far F1 moved, not in which direction.
    assert choose("auto", CPU, checks, ALLOWED).precision == "fp32"


def test_auto_stays_fp32_on_cuda():
    assert choose("auto", torch.device("cuda"), {"bf16": check()}, ALLOWED).precision == "fp32"


def test_the_allowed_change_is_configurable(native_bf16):
    moved = {"bf16": check(f1=89.75)}
    assert choose("auto", CPU, moved, max_f1_change=0.1).precision == "fp32"
    assert choose("auto", CPU, moved, max_f1_change=0.3).precision == "bf16"


def test_an_explicit_request_is_refused_without_a_measurement(no_native_bf16):
    with pytest.raises(PrecisionError, match="no dev-F1 measurement at bf16.*check-precision"):
        choose("bf16", CPU, {}, ALLOWED)


def test_an_explicit_request_is_refused_when_f1_moved_too_much(no_native_bf16):
    with pytest.raises(PrecisionError, match=r"-0\.50 on dev\.txt.*--max-f1-change 0\.1"):
        choose("bf16", CPU, {"bf16": check(f1=89.5)}, ALLOWED)


def test_an_explicit_request_without_native_support_runs_emulated(no_native_bf16):
    choice = choose("bf16", CPU, {"bf16": check()}, ALLOWED)
    assert choice.precision == "bf16" and choice.emulated


def test_fp16_is_refused_on_a_cpu_and_unknown_names_everywhere():
    with pytest.raises(PrecisionError, match="only on CUDA"):
        choose("fp16", CPU, {"fp16": check("fp16")}, ALLOWED)
    with pytest.raises(PrecisionError, match="unknown precision"):
        choose("fp8", CPU, {}, ALLOWED)
    with pytest.raises(PrecisionError, match="must not be negative"):
        choose("auto", CPU, {}, max_f1_change=-1)


def test_the_precision_module_does_not_depend_on_the_worker_config():
    """The model core takes its defaults as arguments: no import of ner_stream.config, directly
    (read from the source) or through another module (a fresh interpreter's loaded modules)."""
    source = Path(prec.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # `from . import config` inside ner_stream is ner_stream.config too.
            module = ".".join(filter(None, ["ner_stream" * bool(node.level), node.module]))
            imported.add(module)
            imported.update(f"{module}.{alias.name}" for alias in node.names)
    assert not {m for m in imported if m.startswith("ner_stream.config")}
    code = "import sys, ner_stream.precision; print('ner_stream.config' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parents[2])  # fmt: skip
    assert loaded.stdout.strip() == "False"


def test_the_worker_takes_its_precision_defaults_from_the_precision_module():
    from ner_stream.config import PRECISIONS, WorkerConfig

    assert PRECISIONS is prec.PRECISIONS
    assert WorkerConfig.max_f1_change == prec.DEFAULT_MAX_F1_CHANGE


def test_checks_survive_the_model_file(tmp_path):
    loaded = random_model()
    loaded.info.extra = with_check(with_check({"note": "kept"}, check()), check(f1=91.0))
    save(tmp_path / "m.nerm", loaded.model, loaded.info)
    back = load(tmp_path / "m.nerm").info.extra
    assert back["note"] == "kept"
    assert checks_of(back) == {"bf16": check(f1=91.0)}  # the later check replaced the earlier


def test_a_bf16_tagger_finds_the_entities_of_the_fp32_tagger():
    # The network really runs in bf16 (emulated on a CPU without it); the CRF stays fp32.
    loaded = random_model()
    fp32 = Tagger(random_model(), TaggerOptions(device="cpu", precision="fp32"))
    loaded.info.extra = with_check({}, check())
    bf16 = Tagger(loaded, TaggerOptions(device="cpu", precision="bf16"))
    assert bf16.model.lstm.weight_ih_l0.dtype == torch.bfloat16
    assert bf16.model.crf.transitions.dtype == torch.float32
    want, got = fp32.tag(TEXTS), bf16.tag(TEXTS)
    assert sum(map(len, want)) > 0

    def spans(docs):
        return [[(e.start, e.end, e.type) for e in doc] for doc in docs]

    assert spans(got) == spans(want)
    pairs = zip([e for doc in want for e in doc], [e for doc in got for e in doc], strict=True)
    scores = [(a.score, b.score) for a, b in pairs]
    # bf16 rounds the network's outputs: scores move a little, and do move.
    assert max(abs(a - b) for a, b in scores) < 0.05
    assert any(a != b for a, b in scores)


def test_the_worker_refuses_a_precision_the_model_has_not_measured(tmp_path):
    # Bad configuration: exit 2 with the reason, before any broker is contacted.
    loaded = random_model()
    save(tmp_path / "m.nerm", loaded.model, loaded.info)
    args = ["run", "--model", str(tmp_path / "m.nerm"), "--precision", "bf16"]
    args += ["--bootstrap-servers", "127.0.0.1:1", "--metrics-port", "0", "--device", "cpu"]
    result = CliRunner().invoke(ner_stream_main, args)
    assert result.exit_code == 2
    assert "precision bf16 refused" in result.output


def test_an_emulated_precision_comes_with_a_warning_and_a_native_one_without():
    cpu = torch.device("cpu")
    warning = Choice("bf16", "explicit", emulated=True).warning(cpu)
    assert warning is not None and "bf16" in warning and "emulated" in warning
    assert "slower than fp32" in warning
    assert Choice("bf16", "auto: native bf16").warning(cpu) is None
    assert Choice("fp32", "auto").warning(cpu) is None
