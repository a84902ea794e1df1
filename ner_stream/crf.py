"""The linear-chain CRF: its training loss, and the one decoder that training and serving share.

A linear-chain conditional random field (Lafferty, McCallum and Pereira, "Conditional Random
Fields: Probabilistic Models for Segmenting and Labeling Sequence Data", ICML 2001) scores a tag
sequence y_1..y_n of a sentence with emissions E [n, K] (the network's per-token tag scores) as

    s(y) = start[y_1] + sum_t E[t, y_t] + sum_{t>1} transitions[y_{t-1}, y_t] + end[y_n]

and p(y | x) = exp(s(y)) / Z, Z summing exp(s) over all K^n sequences.

- Training minimises -log p(gold | x) (`CRF.neg_log_likelihood`), log Z by the forward algorithm in
  log space.
- Decoding (`CRF.decode`) gives each sentence's best sequence, argmax_y s(y), by the Viterbi
  algorithm (max-product dynamic programming with back-pointers), and each chosen tag's marginal
  probability p(y_t = k | x) by forward-backward in probability space with every step's vector
  rescaled to sum to 1 (the scaling of Rabiner, "A Tutorial on Hidden Markov Models and Selected
  Applications in Speech Recognition", Proc. IEEE 77(2), 1989, section V.A). A position's
  marginals are normalised over its K tags anyway, so the scale factors need no bookkeeping.

Decoding runs on whatever device holds the emissions: training's dev scoring, CPU serving and
CUDA serving all call `CRF.decode`. Its cost is one step per position of the longest row, a few
small operations each; rows are sorted longest first so that the rows still running at step t
are a prefix `[:active[t]]` and padding is skipped, and tensors are time-major so that each step
reads and writes one contiguous block. The marginals are computed in float32 (values rescaled at
every step stay near 1); a row whose products still under- or overflow (score gaps beyond
float32's exponent range) is computed again in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CRF(nn.Module):
    """A linear-chain CRF with start and end transitions over K tags, batched over sentences.

    Parameters: `transitions` [K, K] (indexed [from, to]), `start` [K], `end` [K]. Every method
    takes emissions [B, T, K] and a mask [B, T] that is true on each row's first `length`
    positions (padding at the end).
    """

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))  # [from, to]
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))

    def neg_log_likelihood(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Mean over sentences of -log p(tags | emissions), a scalar. Tags [B, T] are gold ids;
        every sentence has length >= 1."""
        return (self._log_partition(emissions, mask) - self._score(emissions, tags, mask)).mean()

    def _score(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """s(tags) of each sentence, [B]."""
        maskf = mask.to(emissions.dtype)
        emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # [B, T]
        score = self.start[tags[:, 0]] + (emit * maskf).sum(1)
        trans = self.transitions[tags[:, :-1], tags[:, 1:]]  # [B, T-1]
        score = score + (trans * maskf[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        return score + self.end[last]

    def _log_partition(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """log Z of each sentence, [B]: the forward algorithm in log space (differentiable)."""
        alpha = self.start + emissions[:, 0]
        for t in range(1, emissions.shape[1]):
            nxt = torch.logsumexp(alpha.unsqueeze(2) + self.transitions, dim=1) + emissions[:, t]
            alpha = torch.where(mask[:, t : t + 1], nxt, alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    @torch.no_grad()
    def decode(
        self, emissions: Tensor, mask: Tensor, with_scores: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Best tags [B, T] int64 and, if asked, the marginal probability of each [B, T] float32.

        On the emissions' device. A row of length 0 is read as length 1 (its first position is
        decoded); past each row's length the tag is 0 and the score 1/K. Emissions of any
        floating dtype are decoded in float32.
        """
        b, t_len, _ = emissions.shape
        if b == 0 or t_len == 0:
            empty = emissions.new_zeros(b, t_len, dtype=torch.float32)
            return empty.long(), (empty if with_scores else None)
        rows = _Rows(mask)
        em = rows.time_major(emissions)
        tags = _viterbi(self, em, rows.active)  # [T, B]
        scores = None
        if with_scores:
            probs = _marginals(self, em, rows.active)
            scores = rows.unsort(probs.gather(2, tags.unsqueeze(2)).squeeze(2).float())
        return rows.unsort(tags), scores

    @torch.no_grad()
    def marginals(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """p(y_t = k | x) for every position and tag, [B, T, K] float32; 1/K past each length."""
        rows = _Rows(mask)
        probs = _marginals(self, rows.time_major(emissions), rows.active)  # [T, B, K]
        return rows.unsort(probs.float())


class _Rows:
    """A batch's rows sorted longest first, so that the rows still running at step t are a
    prefix: the decoder's loops work on `[:active[t]]` and skip padding altogether."""

    def __init__(self, mask: Tensor) -> None:
        # An empty row still has its first position decoded.
        lengths = mask.sum(1).clamp(min=1)
        self.order = torch.argsort(lengths, descending=True, stable=True)
        self.inverse = torch.argsort(self.order)
        t_len = mask.shape[1]
        counts = (lengths.unsqueeze(1) > torch.arange(t_len, device=mask.device)).sum(0)
        # One host transfer for all steps: Python slicing needs plain ints.
        self.active: list[int] = counts.tolist()

    def time_major(self, emissions: Tensor) -> Tensor:
        """Emissions [B, T, K] -> float32 [T, B, K], rows sorted."""
        return emissions.float().index_select(0, self.order).transpose(0, 1).contiguous()

    def unsort(self, x: Tensor) -> Tensor:
        """A time-major result [T, B, ...] -> [B, T, ...] in the batch's own row order."""
        return x.transpose(0, 1).index_select(0, self.inverse)


def _viterbi(crf: CRF, em: Tensor, active: list[int]) -> Tensor:
    """The best path of each row of sorted, time-major emissions [T, N, K]: tags [T, N] int64,
    0 past each row's length."""
    t_len, n, k = em.shape
    trans = crf.transitions.float()
    score = crf.start.float() + em[0]  # [N, K]: best score of a path ending in each tag
    history = torch.zeros(t_len, n, k, dtype=torch.int64, device=em.device)
    for t in range(1, t_len):
        live = active[t]
        # [live, from, to] -> best previous tag of each tag, and its path score.
        candidates = score[:live].unsqueeze(2) + trans
        torch.max(candidates, dim=1, out=(score[:live], history[t, :live]))
        score[:live] += em[t, :live]
    tags = torch.zeros(t_len, n, dtype=torch.int64, device=em.device)
    # Each row's pointer starts at its best last tag and is written once its own last position
    # is reached going backwards; rows that ended earlier keep it until then.
    pointer = (score + crf.end.float()).argmax(dim=1)
    for t in range(t_len - 1, 0, -1):
        live = active[t]
        tags[t, :live] = pointer[:live]
        pointer[:live] = history[t, :live].gather(1, pointer[:live].unsqueeze(1)).squeeze(1)
    tags[0] = pointer
    return tags


def _marginals(crf: CRF, em: Tensor, active: list[int]) -> Tensor:
    """p(y_t = k | x) [T, N, K] of sorted, time-major emissions; 1/K past each row's length.

    float32, and float64 for the rows whose float32 pass did not stay finite.
    """
    probs = _forward_backward(crf, em, active, torch.float32)
    bad = ~torch.isfinite(probs).all(dim=2).all(dim=0)  # [N]
    if bool(bad.any()):
        # Rows are sorted longest first; the rows kept stay so, and their active counts follow.
        rows = bad.nonzero().squeeze(1)
        sub_active = [int((rows < a).sum()) for a in active]
        probs = probs.double()
        probs[:, rows] = _forward_backward(crf, em[:, rows], sub_active, torch.float64)
    return probs


def _forward_backward(crf: CRF, em: Tensor, active: list[int], dtype: torch.dtype) -> Tensor:
    """Forward-backward in probability space at `dtype`, each step rescaled to sum to 1.

    alpha_t = normalise((alpha_{t-1} @ exp(transitions)) * exp(E_t)), beta likewise from the end;
    the marginals are normalise(alpha_t * beta_t). Every exp is of scores relative to their max,
    so each factor is at most 1 (the shifts cancel in the normalisation).
    """
    t_len, n, k = em.shape
    em = em.to(dtype)
    transitions = crf.transitions.to(dtype)
    trans = (transitions - transitions.max()).exp()  # [from, to]
    trans_t = trans.t().contiguous()
    probs = (em - em.amax(dim=2, keepdim=True)).exp_()  # [T, N, K]
    alphas = em.new_ones(t_len, n, k)
    betas = em.new_ones(t_len, n, k)
    first = crf.start.to(dtype) + em[0]
    alpha = (first - first.amax(dim=1, keepdim=True)).exp_()
    alphas[0] = alpha / alpha.sum(dim=1, keepdim=True)
    for t in range(1, t_len):
        live = active[t]
        alpha = alphas[t, :live]
        torch.mm(alphas[t - 1, :live], trans, out=alpha)
        alpha.mul_(probs[t, :live])
        alpha.div_(alpha.sum(dim=1, keepdim=True))
    end = crf.end.to(dtype)
    last = (end - end.max()).exp()
    last = last / last.sum()  # beta at each row's last position: the end transition
    betas[t_len - 1, : active[t_len - 1]] = last
    for t in range(t_len - 2, -1, -1):
        going_on = active[t + 1]  # rows with a position after t
        beta = betas[t, :going_on]
        torch.mm(betas[t + 1, :going_on] * probs[t + 1, :going_on], trans_t, out=beta)
        beta.div_(beta.sum(dim=1, keepdim=True))
        if active[t] > going_on:  # rows whose last position is t
            betas[t, going_on : active[t]] = last
    out = alphas.mul_(betas)
    return out.div_(out.sum(dim=2, keepdim=True))
