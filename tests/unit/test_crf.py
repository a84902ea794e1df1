"""The CRF against brute force and textbook log-space recursions: loss, Viterbi and marginals."""

import itertools

import pytest
import torch

from ner_stream.crf import CRF


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


def reference_viterbi(crf: CRF, em: torch.Tensor, length: int) -> list[int]:
    """The best path of one sentence [T, K], in float64, one position at a time."""
    em, trans = em.double(), crf.transitions.double()
    score = crf.start.double() + em[0]
    back = []
    for t in range(1, length):
        best, idx = (score.unsqueeze(1) + trans).max(dim=0)
        score = best + em[t]
        back.append(idx)
    path = [int((score + crf.end.double()).argmax())]
    for idx in reversed(back):
        path.append(int(idx[path[-1]]))
    return path[::-1]


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


def random_crf_of(k: int, seed: int, std: float = 1.0) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(k)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_(std=std)
    return crf


def mask_of(lengths, t_len: int) -> torch.Tensor:
    return torch.arange(t_len) < torch.as_tensor(lengths).unsqueeze(1)


@pytest.fixture
def random_crf():
    return random_crf_of(3, 0)


@pytest.mark.parametrize("trial", range(10))
def test_viterbi_and_partition_equal_brute_force(random_crf, trial):
    g = torch.Generator().manual_seed(trial)
    lengths = [1 + (trial + i) % 5 for i in range(3)]
    t_max = max(lengths)
    em = torch.randn(3, t_max, 3, generator=g)
    mask = mask_of(lengths, t_max)
    best, scores = random_crf.decode(em, mask)
    log_z = random_crf._log_partition(em, mask)
    for i, n in enumerate(lengths):
        scored = brute_force(random_crf, em[i], n)
        seq, _ = max(scored, key=lambda x: x[1])
        assert best[i, :n].tolist() == list(seq)
        assert best[i, n:].eq(0).all()
        z = torch.logsumexp(torch.stack([s for _, s in scored]), 0)
        assert log_z[i].item() == pytest.approx(z.item(), abs=1e-4)
        # Each chosen tag's score: the probability of all the paths through it.
        for t in range(n):
            p = sum(torch.exp(s - z) for path, s in scored if path[t] == seq[t])
            assert scores[i, t].item() == pytest.approx(p.item(), abs=1e-5)


def test_marginals_equal_brute_force(random_crf):
    g = torch.Generator().manual_seed(7)
    em = torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    marg = random_crf.marginals(em, mask)
    assert marg.dtype == torch.float32
    for i, n in enumerate([4, 2]):
        scored = brute_force(random_crf, em[i], n)
        z = torch.logsumexp(torch.stack([s for _, s in scored]), 0)
        for t in range(n):
            for k in range(3):
                p = sum(torch.exp(s - z) for seq, s in scored if seq[t] == k)
                assert marg[i, t, k].item() == pytest.approx(p.item(), abs=1e-5)
    assert torch.allclose(marg[1, 2:], torch.full((2, 3), 1 / 3))  # past the length: 1/K


def test_nll_is_minus_log_probability_of_gold(random_crf):
    em = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 3, dtype=torch.bool)
    gold = (2, 0, 1)
    scored = dict(brute_force(random_crf, em[0], 3))
    z = torch.logsumexp(torch.stack(list(scored.values())), 0)
    nll = random_crf.neg_log_likelihood(em, torch.tensor([gold]), mask)
    assert nll.item() == pytest.approx((z - scored[gold]).item(), abs=1e-4)


def test_marginals_stay_finite_and_normalised_for_extreme_scores(random_crf):
    # Scores of several hundred would overflow exp() in a naive probability-space recursion.
    g = torch.Generator().manual_seed(11)
    em = torch.randn(3, 40, 3, generator=g) * 300
    mask = mask_of([40, 17, 1], 40)
    marg = random_crf.marginals(em, mask)
    assert torch.isfinite(marg).all()
    assert torch.allclose(marg.sum(2), torch.ones(3, 40, dtype=marg.dtype), atol=1e-6)
    best, chosen = random_crf.decode(em, mask)
    # With scores this far apart the best path's tags carry nearly all the probability.
    assert chosen[mask].min() > 0.99
    for i, n in enumerate([40, 17, 1]):
        assert best[i, :n].tolist() == reference_viterbi(random_crf, em[i], n)


@pytest.mark.parametrize("seed", range(3))
def test_long_rows_equal_log_space_recursions(seed):
    crf = random_crf_of(9, seed, std=3)
    g = torch.Generator().manual_seed(seed)
    lengths = [70, 64, 33, 2, 1, 70, 12]
    em = torch.randn(len(lengths), 70, 9, generator=g) * 5
    mask = mask_of(lengths, 70)
    got = crf.marginals(em, mask).double()
    expected = reference_marginals(crf, em, mask)
    assert (got - expected)[mask].abs().max() < 1e-5
    tags, scores = crf.decode(em, mask)
    for i, n in enumerate(lengths):
        assert tags[i, :n].tolist() == reference_viterbi(crf, em[i], n)
    assert torch.equal(scores, got.float().gather(2, tags.unsqueeze(2)).squeeze(2))


def test_rows_beyond_float32_range_are_decoded_in_float64():
    # Transitions of -120 underflow float32's exp (and with them the row's rescaled products):
    # such rows are computed again in float64 and still agree with the log-space recursion.
    crf = random_crf_of(5, 3, std=2)
    with torch.no_grad():
        crf.transitions[:, 2] = -120.0  # tag 2 is all but forbidden after anything
        crf.transitions[2, :] = -120.0
    g = torch.Generator().manual_seed(1)
    lengths = [9, 9, 4]
    em = torch.randn(3, 9, 5, generator=g)
    em[0, :, 2] += 200.0  # row 0 wants tag 2 everywhere: its best path takes forbidden steps
    mask = mask_of(lengths, 9)
    tags, scores = crf.decode(em, mask)
    marg = crf.marginals(em, mask)
    expected = reference_marginals(crf, em, mask)
    assert torch.isfinite(scores).all() and torch.isfinite(marg).all()
    assert (marg.double() - expected)[mask].abs().max() < 1e-5
    for i, n in enumerate(lengths):
        assert tags[i, :n].tolist() == reference_viterbi(crf, em[i], n)


def test_a_constant_added_to_every_transition_changes_nothing():
    # Every path of a sentence takes length - 1 transitions: a constant cancels in p(y | x), even
    # one whose exp() overflows float64.
    crf = random_crf_of(5, 8, std=2)
    em = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(8)) * 3
    mask = mask_of([12, 7, 1], 12)
    tags, scores = crf.decode(em, mask)
    with torch.no_grad():
        crf.transitions += 800.0
    shifted, shifted_scores = crf.decode(em, mask)
    assert torch.equal(shifted, tags)
    assert torch.allclose(shifted_scores, scores, atol=1e-5)


def test_a_batch_decodes_each_row_as_if_alone():
    crf = random_crf_of(6, 4, std=2)
    g = torch.Generator().manual_seed(5)
    lengths = [3, 11, 1, 11, 7, 2]
    em = torch.randn(len(lengths), 11, 6, generator=g) * 3
    tags, scores = crf.decode(em, mask_of(lengths, 11))
    for i, n in enumerate(lengths):
        alone, alone_scores = crf.decode(em[i : i + 1, :n], torch.ones(1, n, dtype=torch.bool))
        assert tags[i, :n].tolist() == alone[0].tolist()
        assert torch.allclose(scores[i, :n], alone_scores[0], atol=1e-6)
        assert tags[i, n:].eq(0).all()
    # Rows in another order, and emissions past each length, change nothing.
    order = [4, 1, 0, 5, 3, 2]
    noisy = em[order].clone()
    noisy[~mask_of([lengths[i] for i in order], 11)] = 1e4
    again, again_scores = crf.decode(noisy, mask_of([lengths[i] for i in order], 11))
    assert again.tolist() == tags[order].tolist()
    m = mask_of([lengths[i] for i in order], 11)
    assert torch.allclose(again_scores[m], scores[order][m], atol=1e-6)


def test_an_empty_row_decodes_its_first_position():
    crf = random_crf_of(4, 9)
    em = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0))
    tags, scores = crf.decode(em, mask_of([0, 6, 3], 6))
    alone, alone_scores = crf.decode(em[:1, :1], torch.ones(1, 1, dtype=torch.bool))
    assert tags[0].tolist() == [alone[0, 0].item(), 0, 0, 0, 0, 0]
    assert scores[0, 0].item() == pytest.approx(alone_scores[0, 0].item(), abs=1e-6)


def test_decode_without_scores_and_of_empty_batches(random_crf):
    em = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
    mask = mask_of([5, 3], 5)
    tags, scores = random_crf.decode(em, mask, with_scores=False)
    assert scores is None
    assert torch.equal(tags, random_crf.decode(em, mask)[0])
    for shape in [(0, 5, 3), (2, 0, 3)]:
        tags, scores = random_crf.decode(torch.zeros(shape), torch.zeros(shape[:2], dtype=bool))
        assert tags.shape == scores.shape == shape[:2]
        assert tags.dtype == torch.int64 and scores.dtype == torch.float32


def test_low_precision_emissions_decode_in_float32(random_crf):
    em = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(4)).bfloat16()
    mask = mask_of([8, 5], 8)
    tags, scores = random_crf.decode(em, mask)
    expected_tags, expected_scores = random_crf.decode(em.float(), mask)
    assert scores.dtype == torch.float32
    assert torch.equal(tags, expected_tags) and torch.equal(scores, expected_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_decodes_as_the_cpu_does():
    crf = random_crf_of(17, 6, std=2)
    em = torch.randn(40, 30, 17, generator=torch.Generator().manual_seed(6)) * 4
    mask = mask_of(torch.randint(0, 31, (40,), generator=torch.Generator().manual_seed(7)), 30)
    tags, scores = crf.decode(em, mask)
    on_cuda, cuda_scores = crf.cuda().decode(em.cuda(), mask.cuda())
    assert torch.equal(on_cuda.cpu(), tags)
    assert (cuda_scores.cpu() - scores)[mask].abs().max() < 1e-5
