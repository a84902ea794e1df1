"""The model file: one file holding everything needed to tag, and nothing executable.

Layout (a `torch.save` archive of plain containers, read back with `weights_only=True` so that
loading never unpickles code):

    {"format": "ner-stream-model", "format_version": 1,
     "meta": "<JSON: name, version, config, vocabularies, metrics, data fingerprint, ...>",
     "weights": {parameter name: tensor}}

Large embedding tables are stored in float16 to keep the shipped model small; the trainer rounds
them the same way before its final evaluation, so the figures in the file are those of the file.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ner_stream.model import ModelConfig, NerModel
from ner_stream.vocab import Vocabularies

FORMAT = "ner-stream-model"
FORMAT_VERSION = 1
HALF_PRECISION_PARAMS = ("word_embed.weight",)


class CheckpointError(Exception):
    """The model file is missing, corrupt, truncated or not a ner-stream model."""


@dataclass
class ModelInfo:
    """What the model file says about itself, besides the weights."""

    name: str
    version: str
    config: ModelConfig
    vocabs: Vocabularies
    metrics: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A model rebuilt from its file, in eval mode on the CPU."""

    info: ModelInfo
    model: NerModel


def round_half_precision(model: NerModel) -> None:
    """Round the parameters stored as float16 in place, so in-memory and saved models agree."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in HALF_PRECISION_PARAMS:
            if name in params:
                params[name].copy_(params[name].half().float())


def save(path: str | Path, model: NerModel, info: ModelInfo) -> None:
    """Write the model file atomically (a temporary file renamed over the target)."""
    meta = {
        "name": info.name,
        "version": info.version,
        "config": info.config.to_dict(),
        "vocabs": info.vocabs.to_dict(),
        "metrics": info.metrics,
        "data_fingerprint": info.data_fingerprint,
        "extra": info.extra,
    }
    weights = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        weights[name] = t.half() if name in HALF_PRECISION_PARAMS else t.clone()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "meta": json.dumps(meta),
            "weights": weights,
        },
        tmp,
    )
    tmp.replace(path)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    # Every model file is a zip archive (`torch.save`'s format): anything else is refused here,
    # in a few words, rather than by torch with paragraphs about unpickling.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a readable ner-stream model (corrupt or truncated?): not a zip archive"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        EOFError,
        OSError,
        RuntimeError,
        ValueError,
    ) as e:
        raise CheckpointError(
            f"{path} is not a readable ner-stream model (corrupt or truncated?): {e}"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ner-stream model file")
    if blob.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has model format version {blob.get('format_version')}; "
            f"this ner-stream reads version {FORMAT_VERSION}"
        )
    return blob


def load(path: str | Path) -> LoadedModel:
    """Read a model file and rebuild the network; raises CheckpointError with one clear sentence."""
    path = Path(path)
    blob = _read(path)
    try:
        meta = json.loads(blob["meta"])
        config = ModelConfig(**meta["config"])
        info = ModelInfo(
            name=meta["name"],
            version=meta["version"],
            config=config,
            vocabs=Vocabularies.from_dict(meta["vocabs"]),
            metrics=meta.get("metrics", {}),
            data_fingerprint=meta.get("data_fingerprint", ""),
            extra=meta.get("extra", {}),
        )
        model = NerModel(config)
        weights = {k: v.float() if v.is_floating_point() else v for k, v in blob["weights"].items()}
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is a damaged ner-stream model: {e}") from None
    model.eval()
    return LoadedModel(info=info, model=model)


DEFAULT_MODEL_NAME = "en_conll03.nerm"


def default_model_path() -> Path:
    """The English model shipped inside the package."""
    return Path(__file__).parent / "models" / DEFAULT_MODEL_NAME
