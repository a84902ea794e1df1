"""Runners: the network and the CRF decoder over padded passes, behind one protocol.

A runner takes the padded tensors of some forward passes (`batching.pad_pass`) and the number of
real rows in each, and answers the best tags and their confidences of those rows. `LocalRunner`
runs them in this process; `ner_stream.model_process.ModelProcess` runs a `LocalRunner` built from
the model file in a child process and answers later. The `Tagger` talks to either through
`Runner`.

Errors: a runner raises `RunnerDied` (from the call or from `get`) when it cannot serve at all, it
failed to start or its process died, and the passes it held are lost rather than failed: the
tagging stage restarts it and tries them again. Any other exception means that these passes
failed: their documents are tried one at a time, and one that fails alone while the runner still
tags a one-word probe is dead-lettered (`ner_stream.tagging`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ner_stream.checkpoint import load
from ner_stream.model import Batch, NerModel
from ner_stream.precision import cast_network


class RunnerDied(RuntimeError):
    """The runner cannot serve: it failed to start, or it died with the passes it held."""


@dataclass
class Forwarded:
    """Tags [N, T] (int64) and confidences [N, T] (float32) of the real rows of some passes, and
    the seconds the runner spent on them (network and CRF). Already there: a `PendingPass` that
    is always ready."""

    tags: np.ndarray
    scores: np.ndarray
    seconds: float = 0.0

    def ready(self) -> bool:
        """Always True: the answer is here."""
        return True

    def get(self) -> Forwarded:
        """This answer."""
        return self


class PendingPass(Protocol):
    """Passes that may still be running elsewhere (see `Runner`)."""

    def ready(self) -> bool:
        """Whether `get` would return (or raise) without waiting."""
        ...

    def get(self) -> Forwarded:
        """The answer, waiting for it; raises when the passes failed (see the runner)."""
        ...


class Runner(Protocol):
    """Runs padded passes, now or later (see the module docstring for its errors)."""

    def __call__(self, batches: list[Batch], rows: list[int]) -> PendingPass:
        """Start the passes `batches` (one per length bucket: `Batch` tensors of [R_i, T_i] ids,
        [R_i, T_i, C_i] character ids and an [R_i, T_i] mask, as `batching.pad_pass` makes them)
        of which the first `rows[i]` rows are real. The answer (`Forwarded`) holds the tags and
        confidences of the real rows only, batch after batch, [sum(rows), max T_i], each batch's
        rows padded on the right past its T_i."""
        ...


@dataclass
class Emissions:
    """The network's tag scores [N, T, K] of some passes' real rows, and their mask [N, T]."""

    scores: torch.Tensor
    mask: torch.Tensor


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else CPU.

    Raises ValueError for an unknown name, or for CUDA asked for without a CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


class LocalRunner:
    """A model on a device, in this process, at a precision already chosen (see
    `ner_stream.precision.choose`): the network casts to it, the CRF stays fp32."""

    def __init__(self, model: NerModel, device: torch.device, precision: str = "fp32") -> None:
        self.device = device
        self.model = model.to(device).eval()
        if precision != "fp32":
            cast_network(self.model, precision)
        self._pin = device.type == "cuda"

    @classmethod
    def from_file(cls, path: str | Path, device: str, precision: str) -> LocalRunner:
        """The runner of a model file (raises `CheckpointError` for a bad file)."""
        return cls(load(path).model, resolve_device(device), precision)

    @property
    def pin_memory(self) -> bool:
        """Whether padded tensors should be pinned (copied to a CUDA device without a sync)."""
        return self._pin

    def __call__(self, batches: list[Batch], rows: list[int]) -> Forwarded:
        """Run the passes here and now (see `Runner.__call__`)."""
        t0 = time.perf_counter()
        tags, scores = self.decode(self.run_network(batches, rows))
        return Forwarded(tags, scores, time.perf_counter() - t0)

    def run_network(self, batches: list[Batch], rows: list[int]) -> Emissions:
        """The network's emissions of the first `rows[i]` rows of each batch, joined in order.

        The network runs once per batch (one length bucket each); decoding then runs once over all
        of them, because the CRF's cost is its number of steps, not the rows it carries.
        """
        emissions, masks = [], []
        with torch.inference_mode():
            batches = [b.to(self.device, non_blocking=self._pin) for b in batches]
            chars = self.model.char_features([b.chars for b in batches])
            for i, (batch, n) in enumerate(zip(batches, rows, strict=True)):
                features = None if chars is None else chars[i]
                emissions.append(self.model.emissions(batch, features)[:n])
                masks.append(batch.mask[:n])
            width = max(m.shape[1] for m in masks)
            em = torch.cat([nn.functional.pad(e, (0, 0, 0, width - e.shape[1])) for e in emissions])
            mask = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
        return Emissions(em, mask)

    def decode(self, emissions: Emissions) -> tuple[np.ndarray, np.ndarray]:
        """Best tags [N, T] (int64) and their confidences [N, T] (float32) of `emissions`: the
        CRF's Viterbi path and each tag's marginal probability (`crf.CRF.decode`), or for a model
        without a CRF the best tag at each position and its probability."""
        with torch.inference_mode():
            tags, scores = self.model.decode_emissions(emissions.scores, emissions.mask, True)
        assert scores is not None
        return tags.cpu().numpy(), scores.float().cpu().numpy()
