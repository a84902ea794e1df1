"""The training loop: batches of similar length, masked loss, clipping, early stopping on dev F1."""

from __future__ import annotations

import copy
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ner_stream.batching import pad_batch
from ner_stream.checkpoint import ModelInfo, round_half_precision
from ner_stream.model import ModelConfig, NerModel
from ner_stream.precision import PrecisionCheck, cast_network, cpu_has_native_bf16
from ner_stream.spans import convert_tags
from ner_stream.tagger import resolve_device
from ner_stream.text import visible_form
from ner_stream.vocab import (
    UNK_ID,
    EncodedSentence,
    Vocab,
    Vocabularies,
    digit_form,
    word_key,
)
from training.datasets import Sentence
from training.embeddings import Embeddings
from training.evaluate import (
    GMB_TO_CONLL,
    EntityReport,
    entity_scores,
    mapped_entity_scores,
    masked_token_accuracy,
)

DEFAULT_MODEL_NAME = "ner-stream-model"  # stored in the model file when no name is given


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    The defaults of `ner-train train` are these; the shape of the network defaults to
    `ModelConfig`'s (one place for each).
    """

    arch: str = "bilstm-crf"
    tag_scheme: str = ModelConfig.tag_scheme
    epochs: int = 50
    batch_size: int = 64
    lr: float = 2e-3
    lr_decay: float = 0.05  # lr / (1 + decay * epoch)
    # "adam" (Adam, SparseAdam for the word table) or "sgd": SGD with `momentum`, Ma and Hovy's
    # optimiser (2016, section 3.1: batches of 10, lr 0.015, momentum 0.9, the decay above).
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip: float = 5.0
    patience: int = 8
    seed: int = 1
    device: str = "auto"
    word_dim: int = ModelConfig.word_dim  # without pretrained embeddings (theirs otherwise)
    char_encoder: str = ModelConfig.char_encoder
    char_filters: int = ModelConfig.char_filters
    case_dim: int = ModelConfig.case_dim
    hidden: int = ModelConfig.hidden  # LSTM units per direction
    dropout: float = ModelConfig.dropout
    min_word_count: int = 1
    lowercase: bool | None = None  # None: lowercase for bilstm-crf, as-is for lstm
    # None: the architecture's own (see ModelConfig)
    bidirectional: bool | None = ModelConfig.bidirectional
    max_minutes: float | None = None
    word_dropout: float = 0.01  # replace known words by <UNK> so the model learns to use chars
    # Chance that a word seen once in the training data is replaced by <UNK> (Lample et al.
    # 2016, section 4: "singleton" replacement), on top of `word_dropout`.
    singleton_unk: float = 0.0
    # Chance, per sentence and epoch, that a training sentence is seen ALL-CAPS, and the same
    # chance that it is seen lowercase (headlines and chat), tags unchanged.
    case_augment: float = 0.0
    # Keep the pretrained vectors as they are: only rows without one (training words GloVe
    # lacks, <UNK>) learn. Fine-tuned otherwise, and words never seen in training keep theirs.
    freeze_pretrained: bool = False
    # Ship the mean of the weights of this many epochs ending at the best one (1: the best
    # epoch's own weights); the best epoch's own dev F1 is kept in the metrics either way.
    average_last: int = 1
    # Chance, per epoch, that a group of sentences which the raw-text path reads as one sequence
    # (`training.raw_text.paragraph_groups`) is trained as one sequence.
    paragraph_merge: float = 0.5
    merge_max_tokens: int = 128  # a merged sequence stays within the worker's window size


@dataclass
class EpochStats:
    """One line of the training history."""

    epoch: int
    loss: float
    tokens_per_s: float
    dev_f1: float
    dev_accuracy: float
    seconds: float


@dataclass
class RunningEpoch:
    """Figures of the epoch under way, for the progress bar."""

    started: float
    best_f1: float
    loss_sum: float = 0.0
    sentences: int = 0
    tokens: int = 0

    def add(self, loss_sum: float, sentences: int, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.sentences += sentences
        self.tokens += tokens

    def status(self) -> str:
        """`loss 0.5312  4,120 tok/s  best dev F1 93.71`."""
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        best = f"best dev F1 {self.best_f1:.2f}" if self.best_f1 >= 0 else "no dev F1 yet"
        return f"loss {self.loss_sum / max(self.sentences, 1):.4f}  {rate:,.0f} tok/s  {best}"


@dataclass
class TrainResult:
    """The best model (by dev F1), its description and how training went."""

    model: NerModel
    info: ModelInfo
    history: list[EpochStats] = field(default_factory=list)
    best_report: EntityReport | None = None
    # With checkpoint averaging, the best epoch's own weights (`model` holds the average).
    best_epoch_state: dict[str, torch.Tensor] | None = None


def fingerprint(paths: Sequence[str | Path]) -> str:
    """sha256 over the bytes of the training data files, in order."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def build_vocabs(
    train: Sequence[Sentence],
    scheme: str,
    min_count: int,
    embeddings: Embeddings | None,
    lowercase: bool = True,
) -> Vocabularies:
    """Words from the training data (and every pretrained word), characters and tags.

    The digit form (`digit_form`) of each training word with a digit is a word too, learned
    through word dropout (`backoff_ids`), so that a number never seen reads as its shape.
    """
    word_counts = Counter(word_key(t, lowercase) for s in train for t in s.tokens)
    for key, n in list(word_counts.items()):
        shape = digit_form(key.lower())
        if shape != key:
            word_counts[shape] += n
    char_counts = Counter(c for s in train for t in s.tokens for c in visible_form(t))
    tag_counts = Counter(t for s in train for t in convert_tags(s.tags, "iob2", scheme))
    extra = embeddings.words if embeddings is not None and lowercase else ()
    words = Vocab.build(word_counts, min_count=min_count, extra=extra)
    chars = Vocab.build(char_counts)
    # "O" first so that padding positions (tag id 0 under the mask) read as outside.
    tags = Vocab(["O"] + sorted(t for t in tag_counts if t != "O"))
    return Vocabularies(words=words, chars=chars, tags=tags, lowercase=lowercase, backoff=True)


def backoff_ids(vocabs: Vocabularies) -> torch.Tensor:
    """Per word id [V], the id a dropped word is replaced by: its digit form's when it has a
    digit and that form is a word of its own, `UNK_ID` otherwise."""
    stoi = vocabs.words.stoi
    out = torch.full((len(vocabs.words),), UNK_ID, dtype=torch.int64)
    for i, word in enumerate(vocabs.words.itos):
        if i > UNK_ID and any(c.isdigit() for c in word):
            shape = stoi.get(digit_form(word.lower()), UNK_ID)
            if shape != i:
                out[i] = shape
    return out


def singleton_ids(vocabs: Vocabularies, train: Sequence[Sentence]) -> torch.Tensor:
    """Per word id [V], True for the words seen exactly once in `train`."""
    counts = Counter(vocabs.words.stoi.get(word_key(t, vocabs.lowercase)) for s in train
                     for t in s.tokens)  # fmt: skip
    out = torch.zeros(len(vocabs.words), dtype=torch.bool)
    ones = [i for i, n in counts.items() if n == 1 and i is not None and i > UNK_ID]
    out[ones] = True
    return out


def encode_corpus(
    sentences: Sequence[Sentence], vocabs: Vocabularies, scheme: str
) -> list[EncodedSentence]:
    """Every sentence as ids, tags converted to the model's scheme."""
    return [vocabs.encode(s.tokens, convert_tags(s.tags, "iob2", scheme)) for s in sentences]


def iterate_batches(
    data: Sequence[EncodedSentence], batch_size: int, rng: random.Random, shuffle: bool = True
) -> Iterator[list[EncodedSentence]]:
    """The data generator: sentences of similar length together, batches in random order.

    Sorting by length (with a little noise, so batches differ between epochs) keeps padding low.
    """
    order = list(range(len(data)))
    if shuffle:
        order.sort(key=lambda i: len(data[i]) + rng.random() * 2)
    else:
        order.sort(key=lambda i: len(data[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    for idx in batches:
        yield [data[i] for i in idx]


def merged_epoch(
    data: Sequence[EncodedSentence],
    groups: Sequence[Sequence[int]],
    chance: float,
    max_tokens: int,
    rng: random.Random,
) -> list[EncodedSentence]:
    """One epoch's training sequences: ``data``, with each group of ``groups`` (indices into
    ``data``, consecutive sentences of one document) joined into one sequence with probability
    ``chance``. A joined group is cut, at its sentence boundaries, into runs of at most
    ``max_tokens`` tokens, as the worker cuts a long sentence into windows.
    """
    if chance <= 0 or not groups:
        return list(data)
    joined: set[int] = set()
    out: list[EncodedSentence] = []
    for group in groups:
        if rng.random() >= chance:
            continue
        joined.update(group)
        run: list[EncodedSentence] = []
        tokens = 0
        for index in group:
            if run and tokens + len(data[index]) > max_tokens:
                out.append(_join(run))
                run, tokens = [], 0
            run.append(data[index])
            tokens += len(data[index])
        out.append(_join(run))
    out.extend(sentence for i, sentence in enumerate(data) if i not in joined)
    return out


def _join(sentences: Sequence[EncodedSentence]) -> EncodedSentence:
    if len(sentences) == 1:
        return sentences[0]
    return EncodedSentence(
        words=[w for s in sentences for w in s.words],
        chars=[c for s in sentences for c in s.chars],
        cases=[c for s in sentences for c in s.cases],
        tags=[t for s in sentences for t in (s.tags or [])],
    )


def init_embeddings(model: NerModel, vocabs: Vocabularies, embeddings: Embeddings) -> torch.Tensor:
    """Copy pretrained vectors into the word embedding table; returns, per word id [V], True
    where a pretrained vector was found."""
    weight = model.word_embed.weight
    if embeddings.dim != weight.shape[1]:
        raise ValueError(
            f"the embeddings have {embeddings.dim} dimensions but the model's words have "
            f"{weight.shape[1]}; pass --word-dim {embeddings.dim}"
        )
    # Cased vocabularies take the vector of the lowercase form (pretrained vectors are lowercase).
    index = {w: i for i, w in enumerate(embeddings.words)}
    pairs = [
        (r, index[w.lower()])
        for r, w in enumerate(vocabs.words.itos)
        if r > UNK_ID and w.lower() in index
    ]
    scale = float(np.std(embeddings.vectors))
    with torch.no_grad():
        torch.nn.init.uniform_(weight, -scale * math.sqrt(3), scale * math.sqrt(3))
        target = torch.tensor([r for r, _ in pairs])
        source = torch.from_numpy(embeddings.vectors[[i for _, i in pairs]])
        weight[target] = source
        weight[0].zero_()
    found = torch.zeros(len(vocabs.words), dtype=torch.bool)
    found[target] = True
    return found


def predict_tags(
    model: NerModel,
    data: Sequence[EncodedSentence],
    device: torch.device,
    batch_size: int = 256,
) -> list[list[int]]:
    """Best tag ids for each sentence, in input order."""
    model.eval()
    out: list[list[int]] = [[] for _ in data]
    order = sorted(range(len(data)), key=lambda i: len(data[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pad_batch([data[i] for i in idx]).to(device)
            tags, _ = model.decode(batch, with_scores=False)
            rows = tags.cpu().tolist()
            for i, row in zip(idx, rows, strict=True):
                out[i] = row[: len(data[i])]
    return out


def evaluate_model(
    model: NerModel,
    vocabs: Vocabularies,
    sentences: Sequence[Sentence],
    scheme: str,
    device: torch.device,
) -> tuple[EntityReport, float]:
    """Entity P/R/F1 (conlleval) and masked token accuracy on labelled sentences."""
    encoded = encode_corpus(sentences, vocabs, scheme)
    pred_ids = predict_tags(model, encoded, device)
    gold_ids = [e.tags or [] for e in encoded]
    pred = [convert_tags([vocabs.tags.itos[i] for i in p], scheme, "iob2") for p in pred_ids]
    report = entity_scores([s.tags for s in sentences], pred, scheme="iob2")
    accuracy = masked_token_accuracy(*_flat_with_mask(pred_ids, gold_ids))
    return report, accuracy


CASINGS = ("as-is", "upper", "lower")


def recased(sentences: Sequence[Sentence], casing: str) -> list[Sentence]:
    """`sentences` with every token upper- or lower-cased (`casing` one of `CASINGS`; "as-is"
    returns them unchanged), tags kept. Raises ValueError for another casing."""
    if casing not in CASINGS:
        raise ValueError(f"unknown casing {casing!r}: use {', '.join(CASINGS)}")
    if casing == "as-is":
        return list(sentences)
    change = str.upper if casing == "upper" else str.lower
    return [Sentence([change(t) for t in s.tokens], list(s.tags)) for s in sentences]


def out_of_domain_report(
    model: NerModel,
    vocabs: Vocabularies,
    sentences: Sequence[Sentence],
    scheme: str,
    device: torch.device,
    gold_types: dict[str, str] = GMB_TO_CONLL,
) -> EntityReport:
    """Entity P/R/F1 of a model on labelled sentences of another type set (GMB's, by default),
    each gold type mapped to the model's through `gold_types` and predicted MISC ignored (see
    `training.evaluate.mapped_entity_scores`). The sentences' tags are IOB2."""
    encoded = [vocabs.encode(s.tokens) for s in sentences]
    pred_ids = predict_tags(model, encoded, device)
    pred = [convert_tags([vocabs.tags.itos[i] for i in p], scheme, "iob2") for p in pred_ids]
    return mapped_entity_scores([s.tags for s in sentences], pred, gold_types)


def precision_check(
    model: NerModel,
    vocabs: Vocabularies,
    sentences: Sequence[Sentence],
    scheme: str,
    device: torch.device,
    precision: str,
    data_name: str,
    data_sha256: str,
) -> PrecisionCheck:
    """Dev F1 of `model` at fp32 and at `precision`, on the same sentences and device.

    The reduced-precision copy is cast exactly as the worker casts it
    (`ner_stream.precision.cast_network`); `model` itself is left as it was.
    """
    fp32_report, _ = evaluate_model(model, vocabs, sentences, scheme, device)
    reduced = cast_network(copy.deepcopy(model).to(device), precision)
    report, _ = evaluate_model(reduced, vocabs, sentences, scheme, device)
    return PrecisionCheck(
        precision=precision,
        f1=round(report.micro.f1, 4),
        fp32_f1=round(fp32_report.micro.f1, 4),
        data=data_name,
        data_sha256=data_sha256,
        sentences=len(sentences),
        device=device_name(device),
    )


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU's flags that matter for precision."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {native})"


def _flat_with_mask(pred: list[list[int]], gold: list[list[int]]):
    """Pad both to one matrix with a mask, the shape masked accuracy is defined on."""
    t = max((len(g) for g in gold), default=1)
    p = np.zeros((len(gold), t), dtype=np.int64)
    g = np.zeros((len(gold), t), dtype=np.int64)
    m = np.zeros((len(gold), t), dtype=bool)
    for i, (pi, gi) in enumerate(zip(pred, gold, strict=True)):
        p[i, : len(pi)] = pi
        g[i, : len(gi)] = gi
        m[i, : len(gi)] = True
    return p, g, m


def word_dropout(
    words: torch.Tensor,
    rate: float,
    gen: torch.Generator,
    backoff: torch.Tensor,
    singletons: torch.Tensor | None = None,
    singleton_rate: float = 0.0,
) -> torch.Tensor:
    """Word ids [B, T] with some replaced by their back-off (`backoff_ids`: a digit form or
    `UNK_ID`): each known word with chance `rate`, plus `singleton_rate` for the words
    `singletons` marks. Dropout on the word table teaches the network to tag from characters
    and context (Lample et al. 2016, section 4)."""
    if rate <= 0 and (singletons is None or singleton_rate <= 0):
        return words
    chance = torch.full(words.shape, rate)
    if singletons is not None and singleton_rate > 0:
        chance = chance + singleton_rate * singletons[words].float()
    drop = (torch.rand(words.shape, generator=gen) < chance) & (words > UNK_ID)
    return torch.where(drop, backoff[words], words)


def recase_choices(n: int, chance: float, rng: random.Random) -> list[str]:
    """For each of `n` sentences, the casing it is seen in this epoch: "upper" and "lower"
    each with `chance`, "as-is" otherwise."""
    out = []
    for _ in range(n):
        r = rng.random()
        out.append("upper" if r < chance else "lower" if r < 2 * chance else "as-is")
    return out


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts of one network (checkpoint averaging); integer
    tensors are taken from the last."""
    out = {}
    for name, last in states[-1].items():
        if last.is_floating_point():
            out[name] = torch.stack([s[name] for s in states]).mean(0)
        else:
            out[name] = last.clone()
    return out


OPTIMIZERS = ("adam", "sgd")


class SparseMomentumSGD(torch.optim.Optimizer):
    """SGD with momentum for parameters whose gradients are sparse (an embedding table's rows):
    ``buf = momentum * buf + grad; param -= lr * buf``, torch.optim.SGD's form of Polyak's heavy
    ball (Polyak 1964; Sutskever et al. 2013).

    The buffer is kept sparse and coalesced, so it holds the rows touched so far and no more:
    the update is the dense one's, and a row never touched never moves. (torch.optim.SGD keeps a
    sparse buffer uncoalesced, so it grows with every step and each step costs more than the
    last.) Raises RuntimeError for a dense gradient.
    """

    def __init__(self, params, lr: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient (`closure` is not used)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseMomentumSGD takes sparse gradients only")
                grad = p.grad.coalesce()
                state = self.state[p]
                buf = state.get("momentum_buffer")
                buf = grad if buf is None else (buf * group["momentum"] + grad).coalesce()
                state["momentum_buffer"] = buf
                p.add_(buf, alpha=-group["lr"])
        return None


def make_optimizers(
    cfg: TrainConfig, dense_params: list[torch.nn.Parameter], word_table: torch.nn.Parameter
) -> list[torch.optim.Optimizer]:
    """The optimisers of a run: one for the dense parameters, one for the word table, whose
    gradient is sparse (the rows a batch touches).

    `adam`: Adam and SparseAdam (Kingma and Ba 2015). `sgd`: SGD with momentum `cfg.momentum`
    for both (Ma and Hovy 2016, section 3.1), the table's with `SparseMomentumSGD`, so rows of
    words never seen in training are never moved. `weight_decay`
    applies to the dense parameters only. Raises ValueError for another `cfg.optimizer`.
    """
    if cfg.optimizer == "adam":
        return [
            torch.optim.Adam(dense_params, lr=cfg.lr, weight_decay=cfg.weight_decay),
            torch.optim.SparseAdam([word_table], lr=cfg.lr),
        ]
    if cfg.optimizer == "sgd":
        return [
            torch.optim.SGD(
                dense_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            ),
            SparseMomentumSGD([word_table], lr=cfg.lr, momentum=cfg.momentum),
        ]
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


def _freeze_rows(weight: torch.Tensor, frozen: torch.Tensor) -> None:
    """Zero the (sparse) gradient of the rows `frozen` [V] marks, so no optimiser moves them."""

    on = {frozen.device: frozen}  # the mask on each device the gradients come from

    def hook(grad: torch.Tensor) -> torch.Tensor:
        mask = on.get(grad.device)
        if mask is None:
            mask = on[grad.device] = frozen.to(grad.device)
        if grad.is_sparse:
            grad = grad.coalesce()
            keep = ~mask[grad.indices()[0]]
            return torch.sparse_coo_tensor(
                grad.indices()[:, keep],
                grad.values()[keep],
                grad.shape,
                is_coalesced=True,
                check_invariants=False,
            )
        return grad * (~mask).unsqueeze(1)

    weight.register_hook(hook)


ProgressFn = Callable[[str], None]


def train(
    train_sents: Sequence[Sentence],
    dev_sents: Sequence[Sentence],
    cfg: TrainConfig,
    embeddings: Embeddings | None = None,
    name: str = DEFAULT_MODEL_NAME,
    version: str = "0",
    data_fingerprint: str = "",
    log: ProgressFn = print,
    progress: Callable[[Iterator, int, str, Callable[[], str]], Iterator] | None = None,
    merge_groups: Sequence[Sequence[int]] = (),
) -> TrainResult:
    """Train a tagger and return the best epoch's model by dev entity F1.

    ``merge_groups`` are runs of consecutive training sentences (indices into ``train_sents``)
    that the raw-text path reads as one sequence; with ``cfg.paragraph_merge`` above 0 each is
    joined into one training sequence with that chance per epoch (`merged_epoch`).
    """
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if not train_sents:
        raise ValueError("the training data holds no sentences")

    lowercase = cfg.lowercase if cfg.lowercase is not None else cfg.arch == "bilstm-crf"
    vocabs = build_vocabs(train_sents, cfg.tag_scheme, cfg.min_word_count, embeddings, lowercase)
    word_dim = embeddings.dim if embeddings is not None else cfg.word_dim
    mcfg = ModelConfig(
        arch=cfg.arch,
        num_words=len(vocabs.words),
        num_chars=len(vocabs.chars),
        num_tags=len(vocabs.tags),
        tag_scheme=cfg.tag_scheme,
        word_dim=word_dim,
        char_encoder=cfg.char_encoder,
        char_filters=cfg.char_filters,
        case_dim=cfg.case_dim,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
        bidirectional=cfg.bidirectional,
    )
    model = NerModel(mcfg)
    pretrained = torch.zeros(len(vocabs.words), dtype=torch.bool)
    if embeddings is not None:
        pretrained = init_embeddings(model, vocabs, embeddings)
        log(f"pretrained vectors: {int(pretrained.sum())} of {len(vocabs.words)} words")
    if cfg.freeze_pretrained:
        _freeze_rows(model.word_embed.weight, pretrained)
    model.to(device)
    backoff = backoff_ids(vocabs)
    singletons = singleton_ids(vocabs, train_sents) if cfg.singleton_unk > 0 else None
    casings = {"as-is": encode_corpus(train_sents, vocabs, cfg.tag_scheme)}
    if cfg.case_augment > 0:
        for casing in ("upper", "lower"):
            casings[casing] = encode_corpus(recased(train_sents, casing), vocabs, cfg.tag_scheme)
    train_data = casings["as-is"]
    if merge_groups and cfg.paragraph_merge > 0:
        log(
            f"paragraph merge: {len(merge_groups)} runs of {sum(map(len, merge_groups))} "
            f"sentences, each joined with chance {cfg.paragraph_merge} per epoch"
        )
    # The word table is most of the parameters but a batch touches few of its rows: sparse
    # gradients and SparseAdam update only those rows, a third of the step time on a CPU.
    model.word_embed.sparse = True
    dense_params = [p for n, p in model.named_parameters() if n != "word_embed.weight"]
    optimizers = make_optimizers(cfg, dense_params, model.word_embed.weight)
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1.0 + cfg.lr_decay * e))
        for o in optimizers
    ]

    history: list[EpochStats] = []
    best_f1, best_state, stale = -1.0, None, 0
    recent: list[dict[str, torch.Tensor]] = []  # the last `average_last` epochs' weights
    best_recent: list[dict[str, torch.Tensor]] = []
    started = time.monotonic()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.monotonic()
        total_loss, tokens = 0.0, 0
        if cfg.case_augment > 0:
            choices = recase_choices(len(train_data), cfg.case_augment, rng)
            seen = [casings[c][i] for i, c in enumerate(choices)]
        else:
            seen = train_data
        epoch_data = merged_epoch(
            seen, merge_groups, cfg.paragraph_merge, cfg.merge_max_tokens, rng
        )
        n_batches = math.ceil(len(epoch_data) / cfg.batch_size)
        batches = iterate_batches(epoch_data, cfg.batch_size, rng)
        running = RunningEpoch(started=t0, best_f1=best_f1)
        if progress is not None:
            batches = progress(batches, n_batches, f"epoch {epoch}", running.status)
        for sents in batches:
            batch = pad_batch(sents)
            batch.words = word_dropout(
                batch.words, cfg.word_dropout, gen, backoff, singletons, cfg.singleton_unk
            )
            batch = batch.to(device)
            loss = model.loss(batch)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dense_params, cfg.clip)
            for o in optimizers:
                o.step()
            total_loss += loss.item() * len(sents)
            tokens += batch.num_tokens
            running.add(loss.item() * len(sents), len(sents), batch.num_tokens)
        for sched in schedulers:
            sched.step()
        train_s = time.monotonic() - t0
        report, acc = evaluate_model(model, vocabs, dev_sents, cfg.tag_scheme, device)
        stats = EpochStats(
            epoch=epoch,
            loss=total_loss / len(epoch_data),
            tokens_per_s=tokens / max(train_s, 1e-9),
            dev_f1=report.micro.f1,
            dev_accuracy=acc,
            seconds=time.monotonic() - t0,
        )
        history.append(stats)
        improved = report.micro.f1 > best_f1
        log(
            f"epoch {epoch:3d}  loss {stats.loss:8.4f}  dev F1 {stats.dev_f1:6.2f}  "
            f"acc {100 * acc:6.2f}  {stats.tokens_per_s:7.0f} tok/s  {stats.seconds:5.1f}s"
            + ("  *" if improved else "")
        )
        # A copy of the weights (the word table is most of them) only when one is kept.
        state = None
        if improved or cfg.average_last > 1:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if cfg.average_last > 1:
            recent = [*recent[-(cfg.average_last - 1) :], state]
        if improved:
            best_f1, stale = report.micro.f1, 0
            best_state, best_recent = state, list(recent)
        else:
            stale += 1
        elapsed_min = (time.monotonic() - started) / 60
        if stale >= cfg.patience:
            log(f"early stop: no dev F1 gain in {cfg.patience} epochs")
            break
        if cfg.max_minutes is not None and elapsed_min * (epoch + 1) / epoch > cfg.max_minutes:
            log(f"time budget: stopping after {elapsed_min:.1f} min")
            break

    assert best_state is not None
    model.load_state_dict(best_state)
    model.word_embed.sparse = False
    round_half_precision(model)
    final_report, final_acc = evaluate_model(model, vocabs, dev_sents, cfg.tag_scheme, device)
    averaged = {}
    if len(best_recent) > 1:
        best_epoch_f1 = final_report.micro.f1
        model.load_state_dict(average_states(best_recent))
        round_half_precision(model)
        final_report, final_acc = evaluate_model(model, vocabs, dev_sents, cfg.tag_scheme, device)
        averaged = {"averaged_epochs": len(best_recent), "best_epoch_dev_f1": best_epoch_f1}
        log(
            f"averaged the last {len(best_recent)} epochs to the best: dev F1 "
            f"{best_epoch_f1:.2f} -> {final_report.micro.f1:.2f}"
        )
    metrics = {
        "dev": {**final_report.to_dict(), "accuracy": final_acc},
        **averaged,
        "epochs": len(history),
        "best_epoch": max(history, key=lambda h: h.dev_f1).epoch,
        "train_seconds": round(time.monotonic() - started, 1),
        "device": str(device),
        "train_config": asdict(cfg),
    }
    info = ModelInfo(
        name=name,
        version=version,
        config=mcfg,
        vocabs=vocabs,
        metrics=metrics,
        data_fingerprint=data_fingerprint,
    )
    model.cpu().eval()
    return TrainResult(
        model=model,
        info=info,
        history=history,
        best_report=final_report,
        best_epoch_state=best_state if averaged else None,
    )
