"""The CRF against brute force, padding invariance, and the masked loss of the classic recipe."""

import itertools

import pytest
import torch

from ner_stream.batching import pad_batch
from ner_stream.model import CRF, ModelConfig, NerModel, unique_rows
from ner_stream.vocab import EncodedSentence


def brute_force(crf: CRF, emissions: torch.Tensor, length: int):
    """Every tag sequence of one sentence with its score: the ground truth for the CRF."""
    k = emissions.shape[1]
    scored = []
    for seq in itertools.product(range(k), repeat=length):
        s = crf.start[seq[0]] + emissions[0, seq[0]]
        for t in range(1, length):
            s = s + crf.transitions[seq[t - 1], seq[t]] + emissions[t, seq[t]]
        s = s + crf.end[seq[-1]]
        scored.append((seq, s))
    return scored


@pytest.fixture
def random_crf():
    torch.manual_seed(0)
    crf = CRF(3)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    return crf


@pytest.mark.parametrize("trial", range(10))
def test_viterbi_and_partition_equal_brute_force(random_crf, trial):
    g = torch.Generator().manual_seed(trial)
    lengths = [1 + (trial + i) % 5 for i in range(3)]
    t_max = max(lengths)
    em = torch.randn(3, t_max, 3, generator=g)
    mask = torch.tensor([[t < n for t in range(t_max)] for n in lengths])
    best = random_crf.viterbi(em, mask)
    log_z = random_crf._log_partition(em, mask)
    for i, n in enumerate(lengths):
        scored = brute_force(random_crf, em[i], n)
        seq, _ = max(scored, key=lambda x: x[1])
        assert best[i, :n].tolist() == list(seq)
        assert best[i, n:].eq(0).all()
        expected_z = torch.logsumexp(torch.stack([s for _, s in scored]), 0)
        assert log_z[i].item() == pytest.approx(expected_z.item(), abs=1e-4)


def test_marginals_equal_brute_force(random_crf):
    g = torch.Generator().manual_seed(7)
    em = torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    marg = random_crf.marginals(em, mask)
    for i, n in enumerate([4, 2]):
        scored = brute_force(random_crf, em[i], n)
        z = torch.logsumexp(torch.stack([s for _, s in scored]), 0)
        for t in range(n):
            for k in range(3):
                p = sum(torch.exp(s - z) for seq, s in scored if seq[t] == k)
                assert marg[i, t, k].item() == pytest.approx(p.item(), abs=1e-5)


def test_nll_is_minus_log_probability_of_gold(random_crf):
    em = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 3, dtype=torch.bool)
    gold = (2, 0, 1)
    scored = dict(brute_force(random_crf, em[0], 3))
    z = torch.logsumexp(torch.stack(list(scored.values())), 0)
    nll = random_crf.neg_log_likelihood(em, torch.tensor([gold]), mask)
    assert nll.item() == pytest.approx((z - scored[gold]).item(), abs=1e-4)


def sentence(n: int, seed: int) -> EncodedSentence:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(2, 30, (n,), generator=g).tolist()
    chars = [torch.randint(2, 20, (1 + w % 6,), generator=g).tolist() for w in words]
    return EncodedSentence(words=words, chars=chars, cases=[4] * n, tags=[w % 5 for w in words])


@pytest.mark.parametrize("arch", ["lstm", "bilstm-crf"])
def test_padding_does_not_change_predictions(arch):
    torch.manual_seed(0)
    model = NerModel(ModelConfig(arch=arch, num_words=30, num_chars=20, num_tags=5, hidden=8))
    model.eval()
    short, long_ = sentence(3, 1), sentence(9, 2)
    alone_tags, alone_scores = model.decode(pad_batch([short]))
    mixed_tags, mixed_scores = model.decode(pad_batch([short, long_], pad_to=16))
    assert mixed_tags[0, :3].tolist() == alone_tags[0, :3].tolist()
    assert torch.allclose(mixed_scores[0, :3], alone_scores[0, :3], atol=1e-5)
    assert mixed_tags[0, 3:].eq(0).all()


def test_lstm_loss_ignores_padding():
    torch.manual_seed(0)
    model = NerModel(ModelConfig(arch="lstm", num_words=30, num_chars=20, num_tags=5, hidden=8))
    model.eval()
    s = sentence(4, 5)
    loss_alone = model.loss(pad_batch([s]))
    loss_padded = model.loss(pad_batch([s], pad_to=12))
    assert loss_alone.item() == pytest.approx(loss_padded.item(), abs=1e-6)


@pytest.mark.parametrize("arch", ["lstm", "bilstm-crf"])
def test_training_steps_fit_a_tiny_corpus(arch):
    torch.manual_seed(0)
    model = NerModel(
        ModelConfig(arch=arch, num_words=30, num_chars=20, num_tags=5, hidden=16, dropout=0.0)
    )
    data = [sentence(2 + i % 5, i) for i in range(8)]
    batch = pad_batch(data)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(80):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    model.eval()
    tags, scores = model.decode(batch)
    for i, s in enumerate(data):
        assert tags[i, : len(s)].tolist() == s.tags
    assert scores[batch.mask].min() > 0.5


def test_marginals_stay_finite_and_normalised_for_extreme_scores(random_crf):
    # Scores of several hundred would overflow exp() in a naive probability-space recursion.
    g = torch.Generator().manual_seed(11)
    em = torch.randn(3, 40, 3, generator=g) * 300
    mask = torch.tensor([[t < n for t in range(40)] for n in (40, 17, 1)])
    marg = random_crf.marginals(em, mask)
    assert torch.isfinite(marg).all()
    assert torch.allclose(marg.sum(2), torch.ones(3, 40, dtype=marg.dtype), atol=1e-6)
    best = random_crf.viterbi(em, mask)
    # With scores this far apart the best path's tags carry nearly all the probability.
    chosen = marg.gather(2, best.unsqueeze(2)).squeeze(2)[mask]
    assert chosen.min() > 0.99


def reference_marginals(crf: CRF, em: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward-backward in log space and float64: the textbook recursion."""
    em, trans = em.double(), crf.transitions.double()
    b, t_len, k = em.shape
    alphas = [crf.start.double() + em[:, 0]]
    for t in range(1, t_len):
        nxt = torch.logsumexp(alphas[-1].unsqueeze(2) + trans, dim=1) + em[:, t]
        alphas.append(torch.where(mask[:, t : t + 1], nxt, alphas[-1]))
    betas = [crf.end.double().expand(b, k)]
    for t in range(t_len - 2, -1, -1):
        nxt = torch.logsumexp(trans + (em[:, t + 1] + betas[-1]).unsqueeze(1), dim=2)
        betas.append(torch.where(mask[:, t + 1 : t + 2], nxt, betas[-1]))
    betas.reverse()
    joint = torch.stack(alphas, 1) + torch.stack(betas, 1)
    return (joint - torch.logsumexp(joint, dim=2, keepdim=True)).exp()


def test_marginals_equal_log_space_forward_backward_on_long_sentences():
    torch.manual_seed(3)
    crf = CRF(9)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_(std=3)
    em = torch.randn(5, 70, 9) * 5
    mask = torch.tensor([[t < n for t in range(70)] for n in (70, 64, 33, 2, 1)])
    got = crf.marginals(em, mask).double()
    expected = reference_marginals(crf, em, mask)
    assert (got - expected)[mask].abs().max() < 1e-5


@pytest.mark.parametrize("layers", [1, 2])
def test_cpu_inference_bilstm_equals_packed_sequences(layers):
    torch.manual_seed(layers)
    config = ModelConfig(
        arch="bilstm-crf", num_words=30, num_chars=20, num_tags=5, hidden=12, layers=layers
    )
    model = NerModel(config).eval()
    lengths = [9, 1, 5, 9, 3]
    batch = pad_batch([sentence(n, 20 + i) for i, n in enumerate(lengths)], pad_to=12)
    x = torch.randn(len(lengths), 12, model.lstm.input_size)
    with torch.inference_mode():
        fast = model._bilstm_reversed(x, batch.mask)
        packed = model._bilstm_packed(x, batch.mask)
    real = batch.mask.unsqueeze(2).expand_as(fast)
    assert fast.shape == packed.shape
    assert (fast - packed)[real].abs().max() < 1e-5


def test_char_cnn_equals_a_plain_convolution():
    torch.manual_seed(4)
    model = NerModel(ModelConfig(arch="bilstm-crf", num_words=30, num_chars=20, num_tags=5))
    cnn = model.char_encoder
    chars = torch.randint(0, 20, (4, 6, 7))
    chars[0, 0] = 0  # a word made only of padding
    chars[1, :3] = chars[2, :3]  # repeated words share one encoding
    b, t, length = chars.shape
    x = cnn.embed(chars.view(b * t, length)).transpose(1, 2)
    h = cnn.conv(x).masked_fill((chars.view(b * t, 1, length) == 0), float("-inf")).amax(2)
    expected = torch.nan_to_num(h, neginf=0.0).view(b, t, -1)
    assert torch.allclose(cnn(chars), expected, atol=1e-5)


def test_unique_rows_rebuilds_the_input_and_dedups():
    g = torch.Generator().manual_seed(5)
    rows = torch.randint(0, 4, (300, 3), generator=g)
    kept, inverse = unique_rows(rows)
    assert torch.equal(kept[inverse], rows)
    assert len(kept) == len({tuple(r) for r in rows.tolist()})
