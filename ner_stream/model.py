"""The tagger network.

Two architectures share one interface:

- ``lstm``: the classic recipe and our baseline. Embedding -> LSTM -> Linear -> log-softmax over the
  K tags, trained with a masked negative log-likelihood per token.
- ``bilstm-crf``: word embeddings (lowercase, optionally pretrained) + a character CNN or LSTM +
  a casing feature -> BiLSTM -> Linear -> CRF, decoded with batched Viterbi on the model's device.

Both return, at inference, one tag id and one confidence per token (the CRF's marginal probability
of the chosen tag, or the softmax probability for ``lstm``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ner_stream.vocab import CASES, PAD_ID

ARCHS = ("lstm", "bilstm-crf")
CHAR_ENCODERS = ("cnn", "lstm", "none")


@dataclass
class ModelConfig:
    """Shape of the network; stored in the model file so it can be rebuilt without code."""

    arch: str
    num_words: int
    num_chars: int
    num_tags: int
    tag_scheme: str = "bioes"
    word_dim: int = 50
    char_encoder: str = "cnn"
    char_dim: int = 30
    char_filters: int = 50
    case_dim: int = 8
    hidden: int = 200
    layers: int = 1
    dropout: float = 0.5
    bidirectional: bool | None = None  # None: bidirectional for bilstm-crf, not for lstm

    def __post_init__(self) -> None:
        if self.bidirectional is None:
            self.bidirectional = self.arch == "bilstm-crf"
        if self.arch not in ARCHS:
            raise ValueError(
                f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}"
            )
        if self.char_encoder not in CHAR_ENCODERS:
            raise ValueError(
                f"unknown character encoder {self.char_encoder!r}; "
                f"choose one of {', '.join(CHAR_ENCODERS)}"
            )

    def to_dict(self) -> dict:
        """Plain values, for the model file."""
        return asdict(self)


@dataclass
class Batch:
    """A padded batch. Shapes: words/cases/mask [B, T], chars [B, T, L], tags [B, T] or None."""

    words: Tensor
    chars: Tensor
    cases: Tensor
    mask: Tensor
    tags: Tensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """The same batch on `device`."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            move(self.words), move(self.chars), move(self.cases), move(self.mask), move(self.tags)
        )

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


class CharCNN(nn.Module):
    """Character embeddings -> 1-D convolution -> max over the word's characters."""

    def __init__(self, num_chars: int, char_dim: int, filters: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_chars, char_dim, padding_idx=PAD_ID)
        self.conv = nn.Conv1d(char_dim, filters, kernel_size=3, padding=1)
        self.out_dim = filters

    def forward(self, chars: Tensor) -> Tensor:
        b, t, length = chars.shape
        x = self.embed(chars.view(b * t, length)).transpose(1, 2)  # [BT, C, L]
        h = self.conv(x)
        # Padding characters must not win the max: push them to -inf before pooling.
        pad = (chars.view(b * t, 1, length) == PAD_ID).expand_as(h)
        h = h.masked_fill(pad, float("-inf")).amax(dim=2)
        h = torch.nan_to_num(h, neginf=0.0)  # words made only of padding
        return h.view(b, t, self.out_dim)


class CharLSTM(nn.Module):
    """Character embeddings -> BiLSTM -> final states of both directions."""

    def __init__(self, num_chars: int, char_dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_chars, char_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(char_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, chars: Tensor) -> Tensor:
        b, t, length = chars.shape
        flat = chars.view(b * t, length)
        lengths = (flat != PAD_ID).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(flat), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        return torch.cat([h[0], h[1]], dim=1).view(b, t, self.out_dim)


class CRF(nn.Module):
    """A linear-chain CRF with start and end transitions, batched over sentences."""

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))  # [from, to]
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))

    def neg_log_likelihood(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Mean over sentences of -log p(tags | emissions). Every sentence has length >= 1."""
        return (self._log_partition(emissions, mask) - self._score(emissions, tags, mask)).mean()

    def _score(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        maskf = mask.to(emissions.dtype)
        emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # [B, T]
        score = self.start[tags[:, 0]] + (emit * maskf).sum(1)
        trans = self.transitions[tags[:, :-1], tags[:, 1:]]  # [B, T-1]
        score = score + (trans * maskf[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        return score + self.end[last]

    def _forward_alphas(self, emissions: Tensor, mask: Tensor) -> list[Tensor]:
        alpha = self.start + emissions[:, 0]
        alphas = [alpha]
        for t in range(1, emissions.shape[1]):
            nxt = torch.logsumexp(alpha.unsqueeze(2) + self.transitions, dim=1) + emissions[:, t]
            alpha = torch.where(mask[:, t : t + 1], nxt, alpha)
            alphas.append(alpha)
        return alphas

    def _log_partition(self, emissions: Tensor, mask: Tensor) -> Tensor:
        alpha = self._forward_alphas(emissions, mask)[-1]
        return torch.logsumexp(alpha + self.end, dim=1)

    def marginals(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """p(y_t = k | x) for every position, [B, T, K] (forward-backward)."""
        alphas = self._forward_alphas(emissions, mask)
        b, t_len, k = emissions.shape
        beta = self.end.expand(b, k)
        betas = [beta]
        for t in range(t_len - 2, -1, -1):
            nxt = torch.logsumexp(
                self.transitions + (emissions[:, t + 1] + beta).unsqueeze(1), dim=2
            )
            # Past a sentence's end, beta stays the end transition of its last real token.
            beta = torch.where(mask[:, t + 1 : t + 2], nxt, beta)
            betas.append(beta)
        betas.reverse()
        log_z = torch.logsumexp(alphas[-1] + self.end, dim=1, keepdim=True)
        log_m = torch.stack([a + bt - log_z for a, bt in zip(alphas, betas, strict=True)], dim=1)
        return log_m.exp()

    def viterbi(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """The best tag sequence of each sentence, [B, T] (padding positions hold tag 0)."""
        b, t_len, _ = emissions.shape
        score = self.start + emissions[:, 0]
        history = []
        for t in range(1, t_len):
            best, idx = (score.unsqueeze(2) + self.transitions).max(dim=1)
            nxt = best + emissions[:, t]
            m = mask[:, t : t + 1]
            score = torch.where(m, nxt, score)
            # A padded step points back to the same tag, so backtracking passes through it.
            same = torch.arange(score.shape[1], device=score.device).expand_as(idx)
            history.append(torch.where(m, idx, same))
        best_last = (score + self.end).argmax(dim=1)
        path = [best_last]
        for idx in reversed(history):
            best_last = idx.gather(1, best_last.unsqueeze(1)).squeeze(1)
            path.append(best_last)
        path.reverse()
        return torch.stack(path, dim=1).masked_fill(~mask, 0)


class NerModel(nn.Module):
    """The tagger network for either architecture (see module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.word_embed = nn.Embedding(c.num_words, c.word_dim, padding_idx=PAD_ID)
        in_dim = c.word_dim
        self.char_encoder: nn.Module | None = None
        self.case_embed: nn.Embedding | None = None
        if c.arch == "bilstm-crf":
            if c.char_encoder == "cnn":
                self.char_encoder = CharCNN(c.num_chars, c.char_dim, c.char_filters)
            elif c.char_encoder == "lstm":
                self.char_encoder = CharLSTM(c.num_chars, c.char_dim, c.char_filters // 2)
            if self.char_encoder is not None:
                in_dim += self.char_encoder.out_dim
            if c.case_dim:
                self.case_embed = nn.Embedding(len(CASES), c.case_dim, padding_idx=PAD_ID)
                in_dim += c.case_dim
        bidirectional = bool(c.bidirectional)
        self.lstm = nn.LSTM(
            in_dim,
            c.hidden,
            num_layers=c.layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=c.dropout if c.layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(c.dropout)
        self.proj = nn.Linear(c.hidden * (2 if bidirectional else 1), c.num_tags)
        self.crf = CRF(c.num_tags) if c.arch == "bilstm-crf" else None

    def emissions(self, batch: Batch) -> Tensor:
        """Per-token tag scores [B, T, K] (log-probabilities for ``lstm``)."""
        feats = [self.word_embed(batch.words)]
        if self.char_encoder is not None:
            feats.append(self.char_encoder(batch.chars))
        if self.case_embed is not None:
            feats.append(self.case_embed(batch.cases))
        x = self.dropout(torch.cat(feats, dim=2) if len(feats) > 1 else feats[0])
        # Padding sits at the end of every row, so a left-to-right LSTM never lets real tokens
        # see it; the backward direction would, which is why a BiLSTM packs its input.
        if self.config.bidirectional:
            lengths = batch.mask.sum(1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths, batch_first=True, enforce_sorted=False
            )
            out, _ = self.lstm(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        else:
            h, _ = self.lstm(x)
        scores = self.proj(self.dropout(h))
        if self.crf is None:
            return torch.log_softmax(scores, dim=2)
        return scores

    def loss(self, batch: Batch) -> Tensor:
        """Training loss; padded positions contribute nothing."""
        if batch.tags is None:
            raise ValueError("a training batch needs tags")
        em = self.emissions(batch)
        if self.crf is not None:
            return self.crf.neg_log_likelihood(em, batch.tags, batch.mask)
        nll = -em.gather(2, batch.tags.unsqueeze(2)).squeeze(2)
        maskf = batch.mask.to(nll.dtype)
        return (nll * maskf).sum() / maskf.sum()

    def decode(self, batch: Batch, with_scores: bool = True) -> tuple[Tensor, Tensor | None]:
        """Best tag ids [B, T] and, if asked, the confidence of each [B, T]."""
        em = self.emissions(batch)
        if self.crf is None:
            logp, tags = em.max(dim=2)
            return tags.masked_fill(~batch.mask, 0), (logp.exp() if with_scores else None)
        em = em.float()  # the CRF's sums want fp32 even when the network runs in bf16
        tags = self.crf.viterbi(em, batch.mask)
        if not with_scores:
            return tags, None
        probs = self.crf.marginals(em, batch.mask).gather(2, tags.unsqueeze(2)).squeeze(2)
        return tags, probs
