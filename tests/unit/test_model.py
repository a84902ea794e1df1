"""The network: padding invariance, the masked loss of the classic recipe, the CPU fast paths.

The CRF itself is tested in test_crf.py."""

import pytest
import torch

from ner_stream.batching import pad_batch
from ner_stream.model import ModelConfig, NerModel, unique_rows
from ner_stream.vocab import EncodedSentence


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
