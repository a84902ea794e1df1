"""The network's numeric precision: fp32, or bf16/fp16 when the hardware runs it natively and the
model's measured dev F1 allows it.

A reduced precision is never taken on faith: the model file records, per precision, the dev-set
F1 measured at that precision next to the fp32 F1 on the same data (`ner-train train` measures
bf16 at the end of training; `ner-train check-precision` measures any model). The worker runs a
precision only when that record exists and F1 moved by at most `max_f1_change` points.

`auto` picks bf16 on a CPU with native bf16 (AVX-512 BF16 or AMX: oneDNN has bf16 LSTM kernels
there) and fp32 everywhere else, including CUDA, where bf16 and fp16 did not speed up this
model's decoding (see docs/benchmarks.md). An explicit `bf16` or `fp16` runs where asked, with a
warning when the hardware would only emulate it.

Only the network (embeddings, character encoder, LSTM, projection) changes precision; the CRF
always decodes fp32 emissions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ner_stream.model import NerModel

# What a tagger may be asked to run at; `auto` is resolved by `choose`. The worker's
# `--precision` choices (ner_stream.config) are these.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKS_KEY = "precision_checks"  # in the model file's `extra`
# Dev-F1 points a reduced precision may move and still be used: the default of the worker's
# `--max-f1-change` (ner_stream.config reads it from here). `choose` itself has no default.
DEFAULT_MAX_F1_CHANGE = 0.1


class PrecisionError(ValueError):
    """An explicitly requested precision cannot be used with this model or device."""


@dataclass(frozen=True)
class PrecisionCheck:
    """Dev-set F1 of a model run at a reduced precision, next to its fp32 F1 on the same data."""

    precision: str
    f1: float  # percent
    fp32_f1: float  # percent
    data: str  # file name of the labelled data
    data_sha256: str
    sentences: int
    device: str  # where it was measured

    @property
    def change(self) -> float:
        """F1 at this precision minus F1 at fp32, in points."""
        return self.f1 - self.fp32_f1

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for the model file."""
        return asdict(self)


@dataclass(frozen=True)
class Choice:
    """The precision a tagger runs at, and why (for the log)."""

    precision: str
    reason: str
    emulated: bool = False  # the hardware has no native support: slower than fp32

    def warning(self, device: torch.device) -> str | None:
        """What to tell the user when the chosen precision is only emulated on `device`."""
        if not self.emulated:
            return None
        return f"precision {self.precision} is emulated on this {device.type}: slower than fp32"


def checks_of(extra: dict) -> dict[str, PrecisionCheck]:
    """The precision checks recorded in a model file's `extra` metadata, by precision."""
    raw = extra.get(CHECKS_KEY) or {}
    return {name: PrecisionCheck(**fields) for name, fields in raw.items()}


def with_check(extra: dict, check: PrecisionCheck) -> dict:
    """`extra` with `check` recorded (replacing an earlier check of the same precision)."""
    checks = dict(extra.get(CHECKS_KEY) or {})
    checks[check.precision] = check.to_dict()
    return {**extra, CHECKS_KEY: checks}


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def is_native(precision: str, device: torch.device) -> bool:
    """Whether `device` runs the network at `precision` in hardware rather than emulating it."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    return precision == "bf16" and cpu_has_native_bf16()


def choose(
    requested: str,
    device: torch.device,
    checks: dict[str, PrecisionCheck],
    max_f1_change: float,
) -> Choice:
    """The precision to run at for `requested` (one of `PRECISIONS`) on `device`.

    `checks` are the model file's measurements (`checks_of`); `max_f1_change` is how many dev-F1
    points (percent) a reduced precision may move from fp32 and still be used. `auto` falls back
    to fp32 when a reduced precision is not allowed. Raises PrecisionError for an unknown name,
    a negative `max_f1_change`, or an explicit request that is not allowed (fp16 off CUDA, no
    measurement, or F1 moved too much).
    """
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    if max_f1_change < 0:
        raise PrecisionError("--max-f1-change must not be negative")
    if requested == "fp32":
        return Choice("fp32", "asked for")
    if requested == "auto":
        if device.type != "cpu":
            return Choice("fp32", f"auto on {device.type}: reduced precision does not pay here")
        if not is_native("bf16", device):
            return Choice("fp32", "auto: this CPU has no native bf16")
        problem = _gate("bf16", checks, max_f1_change)
        if problem:
            return Choice("fp32", f"auto: {problem}")
        return Choice("bf16", f"auto: native bf16, {_moved('bf16', checks['bf16'])}")
    if requested == "fp16" and device.type != "cuda":
        raise PrecisionError("precision fp16 runs only on CUDA; use bf16 or fp32 on a CPU")
    problem = _gate(requested, checks, max_f1_change)
    if problem:
        raise PrecisionError(f"precision {requested} refused: {problem}")
    return Choice(requested, _moved(requested, checks[requested]), not is_native(requested, device))


def _gate(precision: str, checks: dict[str, PrecisionCheck], max_f1_change: float) -> str | None:
    """Why `precision` may not run (None when it may)."""
    check = checks.get(precision)
    if check is None:
        return (
            f"the model records no dev-F1 measurement at {precision}; measure it with "
            f"`ner-train check-precision --precision {precision} --data DEV --write`"
        )
    if abs(check.change) > max_f1_change:
        return f"{_moved(precision, check)}, more than --max-f1-change {max_f1_change:g}"
    return None


def _moved(precision: str, check: PrecisionCheck) -> str:
    return (
        f"dev F1 {check.fp32_f1:.2f} at fp32, {check.f1:.2f} at {precision} "
        f"({check.change:+.2f} on {check.data})"
    )


def cast_network(model: NerModel, precision: str) -> NerModel:
    """Cast the network to `precision` in place, keeping the CRF's parameters in fp32."""
    model.to(DTYPES[precision])
    if model.crf is not None:
        model.crf.float()
    return model
