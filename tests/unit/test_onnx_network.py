"""The BiLSTM on ONNX Runtime: the same tag scores, entities and confidences as torch, and a
backend chosen, or refused, in one sentence."""

from __future__ import annotations

import random

import pytest
import torch
from click.testing import CliRunner

from ner_stream import onnx_network
from ner_stream.checkpoint import save
from ner_stream.cli import main
from ner_stream.config import WorkerConfig
from ner_stream.model import Batch, ModelConfig, NerModel
from ner_stream.onnx_network import BackendUnavailable, OnnxNetwork, choose_backend
from ner_stream.runner import LocalRunner
from tests.fakes import CHARS, WORDS, make_tagger, random_model

CPU = torch.device("cpu")


def batch(rows: int, length: int, lengths: list[int], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    words = torch.randint(2, len(WORDS), (rows, length), generator=g) * mask
    chars = torch.randint(2, len(CHARS), (rows, length, 5), generator=g) * mask.unsqueeze(2)
    cases = torch.randint(1, 8, (rows, length), generator=g) * mask
    return Batch(words, chars, cases, mask)


@pytest.mark.parametrize("layers", [1, 2])
def test_onnx_scores_equal_torch_on_every_real_token(layers):
    torch.manual_seed(layers)
    config = ModelConfig(arch="bilstm-crf", num_words=len(WORDS), num_chars=len(CHARS),
                         num_tags=5, word_dim=8, char_dim=4, char_filters=6, case_dim=2,
                         hidden=8, layers=layers, dropout=0.0)  # fmt: skip
    model = NerModel(config).eval()
    b = batch(4, 9, [9, 4, 1, 6])
    with torch.inference_mode():
        want = model.emissions(b)
        got = OnnxNetwork(model, threads=1).scores(model.lstm_input(b), b.mask)
    assert got.shape == want.shape
    assert torch.allclose(got[b.mask], want[b.mask], atol=1e-5)


def test_a_pass_without_real_rows_gives_no_scores():
    model = random_model().model
    b = batch(2, 3, [3, 2])
    with torch.inference_mode():
        out = OnnxNetwork(model, threads=1).scores(model.lstm_input(b)[:0], b.mask[:0])
    assert out.shape == (0, 3, model.proj.out_features)


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[2:]).title() for _ in range(rng.randint(1, 40)))
            for _ in range(n)]  # fmt: skip


def test_the_tagger_finds_the_same_entities_with_the_same_confidences_on_both_backends():
    docs = texts(60, 1)
    on_torch = make_tagger("random", backend="torch")
    on_onnx = make_tagger("random", backend="onnx")
    assert (on_torch.backend, on_onnx.backend) == ("torch", "onnx")
    a, b = on_torch.tag(docs), on_onnx.tag(docs)
    assert sum(map(len, a)) > 50
    assert [[(e.start, e.end, e.type) for e in d] for d in a] == [
        [(e.start, e.end, e.type) for e in d] for d in b
    ]
    assert max(abs(x.score - y.score) for d, e in zip(a, b, strict=True)
               for x, y in zip(d, e, strict=True)) < 1e-4  # fmt: skip


def test_auto_takes_onnx_where_it_runs_and_torch_elsewhere_saying_why():
    model = random_model().model
    assert choose_backend("auto", model, CPU, "fp32") == ("onnx", "onnxruntime is installed")
    assert choose_backend("torch", model, CPU, "fp32") == ("torch", "asked for")
    backend, why = choose_backend("auto", model, CPU, "bf16")
    assert backend == "torch" and why == "the onnx backend runs fp32 only, not bf16"
    classic = random_model(arch="lstm").model
    assert choose_backend("auto", classic, CPU, "fp32")[0] == "torch"
    with pytest.raises(BackendUnavailable, match="bidirectional LSTM-CRF models only"):
        choose_backend("onnx", classic, CPU, "fp32")
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("tvm", model, CPU, "fp32")


def test_without_onnxruntime_auto_falls_back_and_onnx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    model = random_model().model
    backend, why = choose_backend("auto", model, CPU, "fp32")
    assert backend == "torch" and "onnxruntime is missing" in why
    with pytest.raises(BackendUnavailable, match=r"pip install 'ner-stream\[onnx\]'"):
        choose_backend("onnx", model, CPU, "fp32")
    with pytest.raises(BackendUnavailable):
        LocalRunner(model, CPU, "fp32", backend="onnx")


def test_tag_backend_flag_and_a_clear_error_when_onnx_is_missing(tmp_path, monkeypatch):
    path = tmp_path / "m.nerm"
    loaded = random_model()
    save(path, loaded.model, loaded.info)
    args = ["tag", "--model", str(path), "--device", "cpu"]
    outs = {}
    for backend in ("torch", "onnx"):
        result = CliRunner().invoke(main, [*args, "--backend", backend], input=b"Ab Cd Ef\n")
        assert result.exit_code == 0, result.output
        outs[backend] = result.stdout
    assert outs["torch"].split('"score"')[0] == outs["onnx"].split('"score"')[0]
    monkeypatch.setattr(onnx_network, "onnx_runtime_missing", lambda: "onnxruntime is missing")
    missing = CliRunner().invoke(main, [*args, "--backend", "onnx"], input=b"Ab\n")
    assert missing.exit_code == 1 and "onnxruntime is missing" in missing.output
    bad = CliRunner().invoke(main, [*args, "--backend", "tvm"], input=b"Ab\n")
    assert bad.exit_code == 2


def test_the_worker_setting_is_validated():
    with pytest.raises(ValueError, match="--backend must be one of auto, torch, onnx"):
        WorkerConfig(backend="x")
    assert WorkerConfig().backend == "auto"


def test_ner_train_compare_backends_reports_agreement_and_fails_on_a_difference(
    tmp_path, monkeypatch
):
    from training.cli import main as ner_train

    path = tmp_path / "m.nerm"
    loaded = random_model()
    save(path, loaded.model, loaded.info)
    data = tmp_path / "dev.txt"
    lines = [f"{w} O" for text in texts(20, 2) for w in text.split()[:12]]
    data.write_text("\n".join(lines[:60]) + "\n\n" + "\n".join(lines[60:]) + "\n", "utf-8")
    args = ["compare-backends", "--model", str(path), "--data", str(data)]
    same = CliRunner().invoke(ner_train, args)
    assert same.exit_code == 0, same.output
    assert "2 sentences" in same.output and "sentences whose entities differ: 0" in same.output
    real = OnnxNetwork.scores
    monkeypatch.setattr(OnnxNetwork, "scores", lambda self, x, m: real(self, x, m).flip(2))
    differ = CliRunner().invoke(ner_train, args)
    assert differ.exit_code == 1 and "sentences whose entities differ: 0" not in differ.output
