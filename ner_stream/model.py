"""The tagger network.

Two architectures share one interface:

- ``lstm``: the classic recipe and our baseline. Embedding -> LSTM -> Linear -> log-softmax over the
  K tags, trained with a masked negative log-likelihood per token.
- ``bilstm-crf``: word embeddings (lowercase, optionally pretrained) + a character CNN or LSTM +
  a casing feature -> BiLSTM -> Linear -> a linear-chain CRF (ner_stream.crf), trained on the
  sentence's log-likelihood and decoded with Viterbi.

Both return, at inference, one tag id and one confidence per token (the CRF's marginal probability
of the chosen tag, or the softmax probability for ``lstm``), through `NerModel.decode_emissions`:
training's dev scoring and the Tagger, on a CPU or CUDA, all decode there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ner_stream.crf import CRF
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


def unique_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of an integer matrix [N, L] and, per row, the index of its copy.

    `torch.unique(dim=0)` compares rows one by one on a CPU; a 64-bit hash of each row sorts in
    one pass. A hash collision is caught by checking the rows rebuilt from the result, and then
    every row is simply kept (correct, only slower).
    """
    n, length = rows.shape
    # Powers of a large odd constant, wrapped to int64: a polynomial hash of the row.
    base, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1
    powers = [pow(base, j + 1, 1 << 64) for j in range(length)]
    signed = [p - (1 << 64) if p >= 1 << 63 else p for p in (q & mask for q in powers)]
    keys = (rows * torch.tensor(signed, dtype=torch.int64, device=rows.device)).sum(1)
    distinct, inverse = torch.unique(keys, return_inverse=True)
    first = torch.empty(len(distinct), dtype=torch.int64, device=rows.device)
    first.scatter_(0, inverse, torch.arange(n, device=rows.device))
    kept = rows[first]
    if not torch.equal(kept[inverse], rows):
        return rows, torch.arange(n, device=rows.device)
    return kept, inverse


class CharCNN(nn.Module):
    """Character embeddings -> 1-D convolution -> max over the word's characters."""

    def __init__(self, num_chars: int, char_dim: int, filters: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_chars, char_dim, padding_idx=PAD_ID)
        self.conv = nn.Conv1d(char_dim, filters, kernel_size=3, padding=1)
        self.out_dim = filters

    def forward(self, chars: Tensor) -> Tensor:
        b, t, length = chars.shape
        return self.encode_rows(chars.reshape(b * t, length)).view(b, t, self.out_dim)

    def encode_rows(self, rows: Tensor) -> Tensor:
        """Features [N, filters] of rows of character ids [N, L], each distinct row encoded once."""
        # A word's features depend on its characters alone, and text repeats words (about a third
        # of the rows of a news batch are distinct).
        distinct, inverse = unique_rows(rows)
        return self._encode(distinct)[inverse]

    def _encode(self, rows: Tensor) -> Tensor:
        """Features of each row of character ids [N, L] -> [N, filters]."""
        n, length = rows.shape
        # The convolution as one matrix product over 3-character windows: for 30 input and 50
        # output channels this is several times faster on a CPU than the library's conv1d.
        # Padding characters read as zeros, as the convolution's own padding does, so that a word's
        # features do not depend on how much padding its batch needs (a trained model's <PAD>
        # embedding is zero anyway; this holds for any weights).
        real = (rows != PAD_ID).unsqueeze(2)
        x = nn.functional.pad(self.embed(rows) * real, (0, 0, 1, 1))  # [N, L + 2, C]
        windows = x.unfold(1, 3, 1).reshape(n * length, -1)  # [N * L, C * 3], channel-major
        weight = self.conv.weight.reshape(self.out_dim, -1)  # [F, C * 3], same order
        h = torch.addmm(self.conv.bias, windows, weight.t()).view(n, length, self.out_dim)
        # Padding characters must not win the max: push them to -inf before pooling.
        h = h.masked_fill(~real, float("-inf")).amax(dim=1)
        return torch.nan_to_num(h, neginf=0.0)  # words made only of padding


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


def reverse_within_lengths(lengths: Tensor, t_len: int) -> Tensor:
    """Flat row indices that reverse each row's first `lengths[b]` positions of a [B, T, ...]
    tensor viewed as [B * T, ...], leaving its padding in place. Applying it twice is identity."""
    positions = torch.arange(t_len, device=lengths.device).unsqueeze(0)
    last = lengths.unsqueeze(1) - 1
    within = torch.where(positions <= last, last - positions, positions)
    rows = torch.arange(lengths.shape[0], device=lengths.device).unsqueeze(1) * t_len
    return (rows + within).reshape(-1)


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

    def char_features(self, chars: Sequence[Tensor]) -> list[Tensor] | None:
        """The character encoder's features [B, T, F] of several batches' characters [B, T, L].

        The CNN encodes the distinct words of all the batches in one pass: words repeat across the
        length buckets of a micro-batch too, and each pass of the encoder has a fixed cost. None
        for a model without a character encoder.
        """
        if self.char_encoder is None:
            return None
        if not isinstance(self.char_encoder, CharCNN):
            return [self.char_encoder(c) for c in chars]
        # Padding characters read as zeros (see CharCNN._encode): rows padded to one width give
        # the same features.
        width = max(c.shape[2] for c in chars)
        rows = torch.cat(
            [
                nn.functional.pad(c, (0, width - c.shape[2]), value=PAD_ID).reshape(-1, width)
                for c in chars
            ]
        )
        features = self.char_encoder.encode_rows(rows)
        sizes = [c.shape[0] * c.shape[1] for c in chars]
        return [
            f.view(c.shape[0], c.shape[1], -1)
            for f, c in zip(features.split(sizes), chars, strict=True)
        ]

    def emissions(self, batch: Batch, char_features: Tensor | None = None) -> Tensor:
        """Per-token tag scores [B, T, K] (log-probabilities for ``lstm``).

        `char_features`: this batch's from `char_features`, when computed for several at once.
        """
        feats = [self.word_embed(batch.words)]
        if self.char_encoder is not None:
            if char_features is None:
                char_features = self.char_encoder(batch.chars)
            feats.append(char_features)
        if self.case_embed is not None:
            feats.append(self.case_embed(batch.cases))
        x = self.dropout(torch.cat(feats, dim=2) if len(feats) > 1 else feats[0])
        # Padding sits at the end of every row, so a left-to-right LSTM never lets real tokens
        # see it; the backward direction would, which is why a BiLSTM needs care.
        if not self.config.bidirectional:
            h, _ = self.lstm(x)
        elif self.training or x.device.type != "cpu":
            h = self._bilstm_packed(x, batch.mask)
        else:
            h = self._bilstm_reversed(x, batch.mask)
        scores = self.proj(self.dropout(h))
        if self.crf is None:
            # fp32 whatever the network runs at: these are the probabilities the scores report.
            return torch.log_softmax(scores.float(), dim=2)
        return scores

    def _bilstm_packed(self, x: Tensor, mask: Tensor) -> Tensor:
        """The BiLSTM over a packed sequence: each direction sees only real tokens."""
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return h

    def _bilstm_reversed(self, x: Tensor, mask: Tensor) -> Tensor:
        """The same function as `_bilstm_packed`, for inference on a CPU.

        Packed sequences force the step-by-step LSTM kernel; a padded tensor runs oneDNN's fused
        LSTM, about twice as fast. Each direction is run as a left-to-right LSTM, the backward one
        over every row reversed within its length, so its padding still comes last.
        """
        b, t_len, _ = x.shape
        flip = reverse_within_lengths(mask.sum(1), t_len)
        for layer in range(self.lstm.num_layers):
            suffix = f"_l{layer}"
            forward = self._lstm_direction(x, suffix)
            flipped = x.reshape(b * t_len, -1).index_select(0, flip).view(b, t_len, -1)
            backward = self._lstm_direction(flipped, suffix + "_reverse")
            backward = backward.reshape(b * t_len, -1).index_select(0, flip).view(b, t_len, -1)
            x = torch.cat([forward, backward], dim=2)
        return x

    def _lstm_direction(self, x: Tensor, suffix: str) -> Tensor:
        """One direction of one layer of `self.lstm`, left to right over padded `x`."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        weights = [getattr(self.lstm, name + suffix) for name in names]
        zeros = x.new_zeros(1, x.shape[0], self.lstm.hidden_size)
        # torch.lstm is the function nn.LSTM calls; args: has_biases, num_layers, dropout, train,
        # bidirectional, batch_first.
        return torch.lstm(x, (zeros, zeros), weights, True, 1, 0.0, False, False, True)[0]

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
        return self.decode_emissions(self.emissions(batch), batch.mask, with_scores)

    def decode_emissions(
        self, emissions: Tensor, mask: Tensor, with_scores: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """`decode` from emissions already computed, e.g. several batches' joined into one."""
        if self.crf is None:
            logp, tags = emissions.max(dim=2)
            return tags.masked_fill(~mask, 0), (logp.exp() if with_scores else None)
        # The CRF decodes in fp32 even when the network runs in bf16.
        return self.crf.decode(emissions, mask, with_scores)
