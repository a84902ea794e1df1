"""The model file: a round trip keeps predictions, and bad files give one clear error."""

import pickle

import pytest
import torch

from ner_stream.batching import pad_batch
from ner_stream.checkpoint import CheckpointError, ModelInfo, load, round_half_precision, save
from ner_stream.model import NerModel
from tests.fakes import random_model


def tiny_model(arch: str) -> tuple[NerModel, ModelInfo]:
    loaded = random_model(0, arch=arch, name="tiny", version="1.2")
    loaded.info.metrics = {"dev": {"f1": 12.5}}
    loaded.info.data_fingerprint = "sha256:abc"
    return loaded.model, loaded.info


@pytest.mark.parametrize("arch", ["lstm", "bilstm-crf"])
def test_round_trip_gives_identical_predictions(tmp_path, arch):
    model, info = tiny_model(arch)
    round_half_precision(model)
    batch = pad_batch([info.vocabs.encode(t.split()) for t in ["Peter went to Paris .", "Paris"]])
    before = model.decode(batch)
    path = tmp_path / "m.nerm"
    save(path, model, info)
    loaded = load(path)
    after = loaded.model.decode(batch)
    assert torch.equal(before[0], after[0])
    assert torch.equal(before[1], after[1])
    assert loaded.info.name == "tiny" and loaded.info.version == "1.2"
    assert loaded.info.metrics == {"dev": {"f1": 12.5}}
    assert loaded.info.data_fingerprint == "sha256:abc"
    assert loaded.info.vocabs.tags.itos == info.vocabs.tags.itos
    assert loaded.info.config == info.config


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope.nerm")


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.nerm"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable ner-stream model"):
        load(path)


def test_truncated_file(tmp_path):
    model, info = tiny_model("bilstm-crf")
    path = tmp_path / "m.nerm"
    save(path, model, info)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load(path)


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not a ner-stream model"):
        load(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.nerm"
    torch.save(
        {"format": "ner-stream-model", "format_version": 99, "meta": "{}", "weights": {}}, path
    )
    with pytest.raises(CheckpointError, match="version 99"):
        load(path)


class Boom:
    def __reduce__(self):
        return (pytest.fail, ("loading the model file executed code",))


def test_loading_never_runs_code_from_the_file(tmp_path):
    path = tmp_path / "evil.nerm"
    torch.save({"format": "ner-stream-model", "format_version": 1, "x": Boom()}, path)
    with pytest.raises(CheckpointError):
        load(path)
    # The same payload as a plain pickle would run the code: the guard above is what stops it.
    with pytest.raises(pytest.fail.Exception):
        pickle.loads(pickle.dumps(Boom()))
