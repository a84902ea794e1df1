"""The numpy CRF decoder agrees with the model's torch CRF (itself checked against brute force)."""

import numpy as np
import pytest
import torch

from ner_stream.crf_host import CrfWeights, decode
from ner_stream.model import CRF


def random_crf(k: int, seed: int) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(k)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_(std=2)
    return crf


def weights_of(crf: CRF) -> CrfWeights:
    return CrfWeights(*(w.detach().numpy() for w in (crf.transitions, crf.start, crf.end)))


@pytest.mark.parametrize("seed", range(5))
def test_paths_and_marginals_equal_the_torch_crf(seed):
    crf = random_crf(7, seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 30, 12, 30, 5, 2, 17])
    em = torch.randn(len(lengths), 30, 7, generator=g) * 4
    mask = torch.arange(30) < lengths.unsqueeze(1)
    tags, probs = decode(weights_of(crf), em.numpy(), lengths.numpy())
    with torch.no_grad():
        expected_tags = crf.viterbi(em, mask)
        expected = crf.marginals(em, mask).gather(2, expected_tags.unsqueeze(2)).squeeze(2)
    assert tags.tolist() == expected_tags.tolist()
    assert np.abs(probs - expected.numpy())[mask.numpy()].max() < 1e-5
    assert (probs[~mask.numpy()] >= 0).all()


def test_rows_of_any_order_and_zero_length_decode_like_length_one():
    crf = random_crf(4, 9)
    em = np.random.default_rng(0).normal(size=(3, 6, 4)).astype(np.float32)
    tags, probs = decode(weights_of(crf), em, np.array([0, 6, 3]))
    alone, alone_probs = decode(weights_of(crf), em[:1, :1], np.array([1]))
    assert tags[0].tolist() == [alone[0, 0], 0, 0, 0, 0, 0]
    assert probs[0, 0] == pytest.approx(alone_probs[0, 0], abs=1e-6)
    again, _ = decode(weights_of(crf), em[[2, 1]], np.array([3, 6]))
    assert again.tolist() == tags[[2, 1]].tolist()


def test_rows_beyond_float32_range_are_decoded_in_float64():
    # Transitions of -120 underflow float32's exp (and with them the row's rescaled products);
    # such rows are computed again in float64 and still agree with the torch CRF.
    crf = random_crf(5, 3)
    with torch.no_grad():
        crf.transitions[:, 2] = -120.0  # tag 2 is all but forbidden after anything
        crf.transitions[2, :] = -120.0
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 9, 4])
    em = torch.randn(3, 9, 5, generator=g)
    em[0, :, 2] += 200.0  # row 0 wants tag 2 everywhere: its best path takes forbidden steps
    mask = torch.arange(9) < lengths.unsqueeze(1)
    with np.errstate(all="raise"):  # the float32 pass must not warn either
        tags, probs = decode(weights_of(crf), em.numpy(), lengths.numpy())
    with torch.no_grad():
        expected_tags = crf.viterbi(em, mask)
        expected = crf.marginals(em, mask).gather(2, expected_tags.unsqueeze(2)).squeeze(2)
    assert np.isfinite(probs).all()
    assert tags.tolist() == expected_tags.tolist()
    assert np.abs(probs - expected.numpy())[mask.numpy()].max() < 1e-5
