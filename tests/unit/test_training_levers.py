"""The generalisation levers of `ner-train train`: the pretrained vocabulary and its back-off,
word dropout and singletons, casing augmentation, frozen vectors, checkpoint averaging."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ner_stream.checkpoint import load
from ner_stream.vocab import UNK_ID
from tests.unit.test_train_cli import sentence, write_corpus
from training.cli import main
from training.datasets import Sentence, load_corpus
from training.embeddings import Embeddings
from training.trainer import (
    SparseMomentumSGD,
    TrainConfig,
    average_states,
    backoff_ids,
    build_vocabs,
    evaluate_model,
    make_optimizers,
    recase_choices,
    recased,
    singleton_ids,
    train,
    word_dropout,
)

TRAIN = [
    Sentence(["Anna", "won", "in", "1996", "."], ["B-PER", "O", "O", "O", "O"]),
    Sentence(["Anna", "lost", "at", "12:45"], ["B-PER", "O", "O", "O"]),
]
VECTORS = Embeddings(["the", "berlin", "1996"], np.arange(6, dtype=np.float32).reshape(3, 2))


def corpus(n: int, seed: int) -> list[Sentence]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pairs = sentence(rng)
        out.append(Sentence([t for t, _ in pairs], [g.replace("I-", "B-") for _, g in pairs]))
    return out


def test_the_vocabulary_keeps_every_pretrained_word_and_the_digit_forms_of_training_numbers():
    vocabs = build_vocabs(TRAIN, "bioes", 1, VECTORS)
    words = vocabs.words
    assert {"the", "berlin", "1996", "anna", "12:45"} <= set(words.itos)
    assert {"0000", "00:00"} <= set(words.itos)
    assert vocabs.backoff
    # A number never seen reads as the shape the training numbers taught.
    assert vocabs.encode(["2031", "03:10", "Berlin"]).words == [
        words.stoi["0000"], words.stoi["00:00"], words.stoi["berlin"],
    ]  # fmt: skip


def test_a_dropped_word_becomes_its_digit_form_or_unk():
    vocabs = build_vocabs(TRAIN, "bioes", 1, VECTORS)
    stoi = vocabs.words.stoi
    backoff = backoff_ids(vocabs)
    assert backoff[stoi["1996"]] == stoi["0000"]
    assert backoff[stoi["12:45"]] == stoi["00:00"]
    assert backoff[stoi["anna"]] == UNK_ID
    assert backoff[stoi["0000"]] == UNK_ID  # a digit form has no further back-off
    words = torch.tensor([[stoi["anna"], stoi["1996"], UNK_ID, 0]])
    gen = torch.Generator().manual_seed(0)
    assert word_dropout(words, 0.999999, gen, backoff).tolist() == [
        [UNK_ID, stoi["0000"], UNK_ID, 0]
    ]
    assert torch.equal(word_dropout(words, 0.0, gen, backoff), words)


def test_singleton_replacement_drops_only_words_seen_once():
    vocabs = build_vocabs(TRAIN, "bioes", 1, VECTORS)
    stoi = vocabs.words.stoi
    once = singleton_ids(vocabs, TRAIN)
    assert not once[stoi["anna"]] and once[stoi["won"]] and not once[stoi["berlin"]]
    words = torch.tensor([[stoi["anna"], stoi["won"], stoi["lost"]]] * 50)
    gen = torch.Generator().manual_seed(0)
    out = word_dropout(words, 0.0, gen, backoff_ids(vocabs), once, 1.0)
    assert (out[:, 0] == stoi["anna"]).all()
    assert (out[:, 1:] == UNK_ID).all()
    half = word_dropout(words, 0.0, gen, backoff_ids(vocabs), once, 0.5)
    assert 0.3 < (half[:, 1:] == UNK_ID).float().mean() < 0.7


def test_recase_choices_give_each_casing_its_chance():
    rng = random.Random(3)
    assert set(recase_choices(100, 0.0, rng)) == {"as-is"}
    picks = recase_choices(20_000, 0.1, rng)
    assert abs(picks.count("upper") / 20_000 - 0.1) < 0.01
    assert abs(picks.count("lower") / 20_000 - 0.1) < 0.01
    assert set(recase_choices(100, 0.5, rng)) == {"upper", "lower"}


def test_average_states_is_the_mean_of_float_weights():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = average_states([a, b])
    assert out["w"].tolist() == [2.0, 4.0]
    assert int(out["n"]) == 5


def _tiny(**changes) -> TrainConfig:
    base = dict(epochs=4, batch_size=8, hidden=16, dropout=0.1, lr=0.01, device="cpu",
                paragraph_merge=0.0, patience=10)  # fmt: skip
    return TrainConfig(**{**base, **changes})


def _vectors(dim: int = 50) -> Embeddings:
    words = ["anna", "oslo", "visited", "never"]
    rng = np.random.default_rng(0)
    return Embeddings(words, rng.normal(0, 0.3, (len(words), dim)).astype(np.float32))


def _rows(result, words: list[str]) -> torch.Tensor:
    stoi = result.info.vocabs.words.stoi
    return result.model.word_embed.weight.detach()[[stoi[w] for w in words]]


def test_frozen_vectors_keep_their_pretrained_values_and_the_others_learn():
    vectors = _vectors()
    pretrained = torch.from_numpy(vectors.vectors).half().float()
    frozen = train(corpus(60, 1), corpus(10, 2), _tiny(freeze_pretrained=True), vectors, log=str)
    assert torch.equal(_rows(frozen, vectors.words), pretrained)
    tuned = train(corpus(60, 1), corpus(10, 2), _tiny(), vectors, log=str)
    # Fine-tuned: training words move, a pretrained word never seen in training keeps its vector.
    assert not torch.equal(_rows(tuned, ["anna", "oslo"]), pretrained[:2])
    assert torch.equal(_rows(tuned, ["never"]), pretrained[3:])
    # Words without a vector learn either way.
    init = train(corpus(60, 1), corpus(10, 2), _tiny(epochs=1, lr=1e-9), vectors, log=str)
    assert not torch.equal(_rows(frozen, ["tom", "hale"]), _rows(init, ["tom", "hale"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_frozen_vectors_stay_frozen_when_training_on_cuda():
    # The mask of frozen rows is built on the CPU; the gradients arrive on the GPU.
    vectors = _vectors()
    pretrained = torch.from_numpy(vectors.vectors).half().float()
    cfg = _tiny(freeze_pretrained=True, device="cuda")
    frozen = train(corpus(60, 1), corpus(10, 2), cfg, vectors, log=str)
    assert torch.equal(_rows(frozen, vectors.words), pretrained)


def unseen_names(sentences: list[Sentence]) -> list[Sentence]:
    """The sentences with every entity token replaced by a made-up word the training lacks."""
    rng = random.Random(7)

    def made_up() -> str:
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))

    out = []
    for s in sentences:
        tokens = [
            made_up().title() if g != "O" else t for t, g in zip(s.tokens, s.tags, strict=True)
        ]
        out.append(Sentence(tokens, s.tags))
    return out


def test_casing_augmentation_teaches_the_model_lowercase_and_all_caps_text():
    # Names the training never saw: only capitals and context can find them.
    train_set, dev = corpus(150, 1), unseen_names(corpus(40, 2))
    scores = {}
    for augment in (0.0, 0.3):
        result = train(train_set, dev, _tiny(epochs=6, case_augment=augment), log=str)
        for casing in ("lower", "upper"):
            report, _ = evaluate_model(
                result.model, result.info.vocabs, recased(dev, casing), "bioes",
                torch.device("cpu"),
            )  # fmt: skip
            scores[augment, casing] = report.micro.f1
    assert scores[0.3, "lower"] > scores[0.0, "lower"] + 10
    assert scores[0.3, "upper"] >= scores[0.0, "upper"]


def test_checkpoint_averaging_writes_the_average_and_the_best_epoch_beside_it(tmp_path):
    write_corpus(tmp_path / "train.txt", 60, 3)
    write_corpus(tmp_path / "dev.txt", 12, 4)
    args = ["train", "--train", str(tmp_path / "train.txt"), "--dev", str(tmp_path / "dev.txt")]
    args += ["--out", str(tmp_path / "m.nerm"), "--epochs", "4", "--hidden", "8", "--lr", "0.01"]
    args += ["--device", "cpu", "--average-last", "3", "--patience", "10"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    averaged, best = load(tmp_path / "m.nerm"), load(tmp_path / "m.best-epoch.nerm")
    metrics = averaged.info.metrics
    assert metrics["averaged_epochs"] == 3
    assert best.info.metrics == {"dev_f1": metrics["best_epoch_dev_f1"]}
    a, b = averaged.model.state_dict(), best.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    dev = load_corpus(tmp_path / "dev.txt", "conll")
    report, _ = evaluate_model(best.model, best.info.vocabs, dev, "bioes", torch.device("cpu"))
    assert report.micro.f1 == pytest.approx(metrics["best_epoch_dev_f1"], abs=1e-6)


def test_sgd_with_momentum_learns_and_moves_only_rows_seen_in_training():
    vectors = _vectors()
    pretrained = torch.from_numpy(vectors.vectors).half().float()
    cfg = _tiny(optimizer="sgd", momentum=0.9, lr=0.05, epochs=6)
    tuned = train(corpus(60, 1), corpus(10, 2), cfg, vectors, log=str)
    assert tuned.history[-1].loss < tuned.history[0].loss
    assert max(h.dev_f1 for h in tuned.history) > 50
    assert not torch.equal(_rows(tuned, ["anna", "oslo"]), pretrained[:2])
    # The table's momentum is sparse: a word never seen in training keeps its vector.
    assert torch.equal(_rows(tuned, ["never"]), pretrained[3:])
    frozen = train(corpus(60, 1), corpus(10, 2), replace(cfg, freeze_pretrained=True), vectors,
                   log=str)  # fmt: skip
    assert torch.equal(_rows(frozen, vectors.words), pretrained)


def test_the_optimizer_is_the_one_asked_for():
    params = [torch.nn.Parameter(torch.zeros(3))]
    table = torch.nn.Parameter(torch.zeros(5, 2))
    adam = make_optimizers(_tiny(), params, table)
    assert [type(o) for o in adam] == [torch.optim.Adam, torch.optim.SparseAdam]
    sgd = make_optimizers(_tiny(optimizer="sgd", momentum=0.8), params, table)
    assert [type(o) for o in sgd] == [torch.optim.SGD, SparseMomentumSGD]
    assert all(o.param_groups[0]["momentum"] == 0.8 for o in sgd)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizers(_tiny(optimizer="rmsprop"), params, table)


def test_sparse_momentum_matches_dense_sgd_and_its_buffer_stays_the_rows_touched():
    """The table's optimiser makes torch.optim.SGD's dense momentum updates, while its buffer
    holds only the rows touched so far, each once, however many steps (a buffer that grew with
    every step made each SGD step slower than the last)."""
    torch.manual_seed(0)
    sparse_table = torch.nn.Embedding(50, 4, sparse=True)
    dense_table = torch.nn.Embedding(50, 4)
    dense_table.weight.data.copy_(sparse_table.weight.data)
    untouched = sparse_table.weight.detach()[40:].clone()
    sparse_opt = SparseMomentumSGD(sparse_table.parameters(), lr=0.1, momentum=0.9)
    dense_opt = torch.optim.SGD(dense_table.parameters(), lr=0.1, momentum=0.9)
    for step in range(200):
        ids = torch.tensor([step % 7, (3 * step) % 11, 20 + step % 5])
        for table, opt in ((sparse_table, sparse_opt), (dense_table, dense_opt)):
            opt.zero_grad()
            table(ids).pow(2).sum().backward()
            opt.step()
    assert torch.allclose(sparse_table.weight, dense_table.weight, atol=1e-5)
    assert torch.equal(sparse_table.weight.detach()[40:], untouched)
    buf = sparse_opt.state[sparse_table.weight]["momentum_buffer"]
    assert buf.is_coalesced() and buf._nnz() <= 7 + 11 + 5
    with pytest.raises(RuntimeError, match="sparse gradients only"):
        dense_table.weight.grad = torch.ones(50, 4)
        SparseMomentumSGD([dense_table.weight], lr=0.1, momentum=0.9).step()
