"""CRF decoding on the host with numpy: Viterbi paths and the marginals of their tags.

The same functions as `CRF.viterbi` and `CRF.marginals` (ner_stream/model.py), for inference on a
CPU. A CRF step is a handful of operations on [rows, K] arrays, a few microseconds of work each.
Each torch call releases the GIL and must win it back, which in the worker means waiting for the
consuming thread's next switch; numpy keeps the GIL through small operations, so the steps of a
micro-batch do not queue behind the rest of the process, and numpy's per-call cost is lower too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CrfWeights:
    """A trained CRF's parameters as arrays: transitions [from, to], start [K], end [K]."""

    transitions: np.ndarray
    start: np.ndarray
    end: np.ndarray


def decode(
    weights: CrfWeights, emissions: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Best tags [N, T] (0 past each length) and each tag's marginal probability [N, T].

    `emissions` is [N, T, K]; `lengths` [N] counts each row's real positions (0 is read as 1, the
    way a batch always decodes its first position).
    """
    n, t_len, _ = emissions.shape
    lengths = np.maximum(lengths.astype(np.int64), 1)
    # Longest rows first: the rows still running at step t are then a prefix, [:active[t]].
    order = np.argsort(-lengths, kind="stable")
    em = emissions[order]
    active = (lengths[order][:, None] > np.arange(t_len)).sum(0).tolist()
    tags = _viterbi(weights, em, active)
    probs = _marginals(weights, em, active)
    chosen = np.take_along_axis(probs, tags[:, :, None], axis=2)[:, :, 0]
    inverse = np.argsort(order)
    tags = tags[inverse]
    chosen = chosen[inverse].astype(np.float32)
    past_end = np.arange(t_len) >= lengths[:, None]
    tags[past_end] = 0
    return tags, chosen


def _viterbi(weights: CrfWeights, em: np.ndarray, active: list[int]) -> np.ndarray:
    n, t_len, _ = em.shape
    trans = weights.transitions
    score = weights.start + em[:, 0]
    history = []
    for t in range(1, t_len):
        live = active[t]
        candidates = score[:live, :, None] + trans  # [live, from, to]
        best_from = candidates.argmax(axis=1)  # [live, to]
        best = np.take_along_axis(candidates, best_from[:, None, :], axis=1)[:, 0]
        score[:live] = best + em[:live, t]
        history.append(best_from)
    tags = np.zeros((n, t_len), dtype=np.int64)
    # Each row's pointer starts at its best last tag and is written once its own last position
    # is reached going backwards; rows that ended earlier keep it until then.
    pointer = (score + weights.end).argmax(axis=1)
    for t in range(t_len - 1, 0, -1):
        live = active[t]
        tags[:live, t] = pointer[:live]
        pointer[:live] = history[t - 1][np.arange(live), pointer[:live]]
    tags[:, 0] = pointer
    return tags


def _marginals(weights: CrfWeights, em: np.ndarray, active: list[int]) -> np.ndarray:
    """p(y_t = k | x) [N, T, K]; positions past a row's end hold 1/K.

    Computed in float32, which is enough for probabilities rescaled at every step and about a
    third faster than float64; a row whose products underflowed anyway (a transition or emission
    gap beyond float32's range) is computed again in float64.
    """
    with np.errstate(all="ignore"):  # what over- or underflows is caught just below
        probs = _forward_backward(weights, em, active, np.float32)
    bad = ~np.isfinite(probs).all(axis=(1, 2))
    if bad.any():
        # Rows are sorted longest first; the rows kept stay so, and their active counts follow.
        rows = np.flatnonzero(bad)
        sub_active = [int((rows < a).sum()) for a in active]
        probs = probs.astype(np.float64)
        probs[rows] = _forward_backward(weights, em[rows], sub_active, np.float64)
    return probs


def _forward_backward(
    weights: CrfWeights, em: np.ndarray, active: list[int], dtype: type
) -> np.ndarray:
    """Forward-backward in probability space with each step rescaled (see `CRF.marginals`)."""
    n, t_len, k = em.shape
    em = em.astype(dtype)
    trans = np.exp(weights.transitions.astype(dtype))
    trans_t = np.ascontiguousarray(trans.T)
    # Time-major, so that each step reads and writes one contiguous block of rows.
    probs = np.ascontiguousarray(np.exp(em - em.max(axis=2, keepdims=True)).transpose(1, 0, 2))
    alphas = np.ones((t_len, n, k), dtype)
    betas = np.ones((t_len, n, k), dtype)
    first = weights.start.astype(dtype) + em[:, 0]
    alpha = _normalise(np.exp(first - first.max(axis=1, keepdims=True)))
    alphas[0] = alpha
    for t in range(1, t_len):
        live = active[t]
        alpha = alpha[:live] @ trans
        alpha *= probs[t, :live]
        alpha /= alpha.sum(axis=1, keepdims=True)
        alphas[t, :live] = alpha
    end = weights.end.astype(dtype)
    beta = np.tile(_normalise(np.exp(end - end.max())), (n, 1))
    for t in range(t_len - 1, -1, -1):
        live = active[t]
        betas[t, :live] = beta[:live]
        if t > 0:
            step = (beta[:live] * probs[t, :live]) @ trans_t
            beta[:live] = step / step.sum(axis=1, keepdims=True)
    out = alphas * betas
    out /= out.sum(axis=2, keepdims=True)
    return out.transpose(1, 0, 2)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / x.sum(axis=-1, keepdims=True)
