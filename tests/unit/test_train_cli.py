"""ner-train end to end on a tiny hand-made corpus: train, evaluate, predict."""

import inspect
import json
import random
from dataclasses import MISSING, fields

import click
import pytest
import torch
from click.testing import CliRunner

from ner_stream import cli as stream_cli
from ner_stream.checkpoint import load, save
from ner_stream.model import ModelConfig
from ner_stream.precision import checks_of
from ner_stream.tagger import Tagger, TaggerOptions
from tests.fakes import random_model, rigged_model
from training import cli as train_cli
from training.cli import main
from training.trainer import DEFAULT_MODEL_NAME, TrainConfig, train

PEOPLE = [("Anna", "Berg"), ("Tom", "Hale"), ("Ines", "Moreau"), ("Raj", "Patel")]
PLACES = ["Oslo", "Lima", "Cairo", "Quito", "Perth"]
ORGS = ["Acme", "Globex", "Initech"]


def sentence(rng: random.Random) -> list[tuple[str, str]]:
    first, last = rng.choice(PEOPLE)
    place, org = rng.choice(PLACES), rng.choice(ORGS)
    shape = rng.randrange(3)
    if shape == 0:
        return [(first, "I-PER"), (last, "I-PER"), ("visited", "O"), (place, "I-LOC"), (".", "O")]
    if shape == 1:
        return [(org, "I-ORG"), ("hired", "O"), (first, "I-PER"), ("in", "O"), (place, "I-LOC")]
    return [("In", "O"), (place, "I-LOC"), (",", "O"), (org, "I-ORG"), ("grew", "O"), (".", "O")]


def write_corpus(path, n: int, seed: int, documents: int = 3) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % -(-n // documents) == 0:
            lines += ["-DOCSTART- -X- O O", ""]
        lines += [f"{tok} NN O {tag}" for tok, tag in sentence(rng)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d / "train.txt", 120, 1)
    write_corpus(d / "dev.txt", 30, 2)
    model = d / "tiny.nerm"
    args = ["train", "--train", str(d / "train.txt"), "--dev", str(d / "dev.txt")]
    args += ["--out", str(model), "--epochs", "8", "--hidden", "32", "--batch-size", "8"]
    args += ["--dropout", "0.1", "--lr", "0.01", "--device", "cpu", "--name", "tiny"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return d, model, result.output


def test_train_writes_a_model_and_reports_dev_scores(trained):
    _, model, output = trained
    assert model.stat().st_size > 0
    assert "FB1" in output


def test_evaluate_json_reports_percentages_and_types(trained):
    d, model, _ = trained
    args = ["evaluate", "--model", str(model), "--data", str(d / "dev.txt"), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["f1"] >= 90.0
    assert 0.9 <= report["accuracy"] <= 1.0
    assert set(report["per_type"]) == {"PER", "LOC", "ORG"}


def test_predict_gives_entities_with_offsets(trained):
    _, model, _ = trained
    text = "Anna Berg visited Lima ."
    result = CliRunner().invoke(main, ["predict", "--model", str(model)], input=text + "\n")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert sorted(out) == ["entities", "id"] and out["id"] == "1"  # as `ner-stream tag` writes
    found = {(e["text"], e["type"]) for e in out["entities"]}
    assert found == {("Anna Berg", "PER"), ("Lima", "LOC")}
    for e in out["entities"]:
        assert text[e["start"] : e["end"]] == e["text"]
        assert 0.0 < e["score"] <= 1.0


def test_bad_corpus_line_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Anna NN O I-PER\nBerg NN\n", encoding="utf-8")
    args = ["train", "--train", str(bad), "--dev", str(bad), "--out", str(tmp_path / "m")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "bad.txt:2" in result.output


def test_missing_model_is_a_clear_error(tmp_path):
    args = ["predict", "--model", str(tmp_path / "none.nerm")]
    result = CliRunner().invoke(main, args, input="x\n")
    assert result.exit_code == 1
    assert "model file not found" in result.output


def test_training_records_the_dev_f1_of_the_model_in_bf16(trained):
    d, model, output = trained
    check = checks_of(load(model).info.extra)["bf16"]
    assert check.sentences == 30 and check.data == "dev.txt"
    assert 0.0 <= check.f1 <= 100.0
    evaluated = CliRunner().invoke(
        main, ["evaluate", "--model", str(model), "--data", str(d / "dev.txt"), "--json"]
    )
    assert check.fp32_f1 == pytest.approx(json.loads(evaluated.output)["f1"], abs=1e-3)
    assert "at bf16" in output


def test_check_precision_writes_the_measurement_the_worker_gates_on(trained, tmp_path):
    d, model, _ = trained
    copy = tmp_path / "copy.nerm"
    loaded = load(model)
    loaded.info.extra = {}  # as a model trained before precision checks existed
    save(copy, loaded.model, loaded.info)
    with pytest.raises(ValueError, match="no dev-F1 measurement"):
        Tagger.from_file(copy, TaggerOptions(device="cpu", precision="bf16"))
    args = ["check-precision", "--model", str(copy), "--data", str(d / "dev.txt")]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--write", "--json"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.output[result.output.index("{") : result.output.rindex("}") + 1])
    assert checks_of(load(copy).info.extra)["bf16"].f1 == reported["f1"]
    # The weights are the file's own, not the bf16 copy the measurement ran.
    for name, tensor in load(copy).model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    tagger = Tagger.from_file(
        copy, TaggerOptions(device="cpu", precision="bf16", max_f1_change=100.0)
    )
    assert tagger.precision.precision == "bf16"


def test_evaluate_raw_scores_each_layout_against_the_token_level_figure(trained):
    d, model, _ = trained
    for layout in ("lines", "paragraph", "wrapped"):
        args = ["evaluate", "--model", str(model), "--data", str(d / "dev.txt"), "--json"]
        result = CliRunner().invoke(main, [*args, "--raw", layout])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["layout"] == layout and report["line_breaks"] == "auto"
        assert report["documents"] == 3
        assert report["gold"] == report["token_level"]["gold"] > 0
        assert report["f1"] >= 80.0
        assert report["gap"] == pytest.approx(report["token_level"]["f1"] - report["f1"], abs=1e-3)
        assert set(report["errors"]) == {
            "wrong_boundary", "wrong_type", "missed", "spurious", "crossing_line_break",
        }  # fmt: skip
    table = CliRunner().invoke(main, [*args[:-1], "--raw", "lines", "--line-breaks", "space"])
    assert table.exit_code == 0, table.output
    assert "layout lines, --line-breaks space, 3 documents" in table.output
    assert "predicted entities across a line break:" in table.output


def test_evaluate_raw_needs_documents(trained):
    d, model, _ = trained
    args = ["evaluate", "--model", str(model), "--data", str(d / "dev.txt"), "--raw", "lines"]
    result = CliRunner().invoke(main, [*args, "--format", "wnut"])
    assert result.exit_code == 2
    assert "--raw needs --format conll" in result.output


def test_paragraph_merge_trains_and_is_recorded(tmp_path):
    write_corpus(tmp_path / "train.txt", 60, 3, documents=6)
    write_corpus(tmp_path / "dev.txt", 12, 4)
    args = ["train", "--train", str(tmp_path / "train.txt"), "--dev", str(tmp_path / "dev.txt")]
    args += ["--out", str(tmp_path / "m.nerm"), "--epochs", "2", "--hidden", "8"]
    args += ["--device", "cpu", "--paragraph-merge", "0.25"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = load(tmp_path / "m.nerm").info.metrics["train_config"]
    assert config["paragraph_merge"] == 0.25
    # The corpus's sentences without a final period run into the next one in a paragraph.
    assert "paragraph merge: " in result.output
    assert "each joined with chance 0.25 per epoch" in result.output
    off = CliRunner().invoke(main, [*args[:-1], "0", "--out", str(tmp_path / "off.nerm")])
    assert off.exit_code == 0, off.output
    assert "paragraph merge" not in off.output


def _option_defaults(command: str) -> dict[str, object]:
    params = main.commands[command].params
    return {p.name: p.default for p in params if isinstance(p, click.Option) and p.name}


def test_the_defaults_of_ner_train_train_are_those_of_train_config():
    options = _option_defaults("train")
    config = {f.name: f.default for f in fields(TrainConfig)}
    shared = set(options) & set(config)
    assert shared == {
        "arch", "tag_scheme", "epochs", "batch_size", "lr", "optimizer", "momentum", "patience",
        "seed", "device", "word_dim", "char_encoder", "hidden", "dropout", "lowercase",
        "bidirectional", "paragraph_merge", "max_minutes", "word_dropout", "singleton_unk",
        "case_augment", "freeze_pretrained", "average_last",
    }  # fmt: skip
    for name in sorted(shared):
        assert options[name] == config[name], name
    assert (
        options["name"] == DEFAULT_MODEL_NAME == inspect.signature(train).parameters["name"].default
    )
    for command in ("evaluate", "check-precision"):
        assert _option_defaults(command)["device"] == TrainConfig.device


def test_train_without_options_trains_with_train_config_defaults(tmp_path, monkeypatch):
    """Every option reaches TrainConfig: no flags given is exactly TrainConfig()."""
    seen = []

    def stop(train_sents, dev_sents, cfg, **kwargs):
        seen.append(cfg)
        raise click.ClickException("stopped before training")

    monkeypatch.setattr(train_cli, "train", stop)
    write_corpus(tmp_path / "c.txt", 6, 5)
    args = ["train", "--train", str(tmp_path / "c.txt"), "--dev", str(tmp_path / "c.txt")]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "m.nerm")])
    assert "stopped before training" in result.output
    assert seen == [TrainConfig()]


def test_the_network_shape_defaults_of_training_are_those_of_model_config():
    model = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}
    config = {f.name: f.default for f in fields(TrainConfig)}
    shared = set(model) & set(config)
    assert shared == {
        "tag_scheme", "word_dim", "char_encoder", "char_filters", "case_dim", "hidden", "dropout",
        "bidirectional",
    }  # fmt: skip
    for name in sorted(shared):
        assert config[name] == model[name], name


def test_line_breaks_without_raw_is_refused(trained):
    d, model, _ = trained
    args = ["evaluate", "--model", str(model), "--data", str(d / "dev.txt")]
    result = CliRunner().invoke(main, [*args, "--line-breaks", "space"])
    assert result.exit_code == 2
    assert "applies to --raw only" in result.output


def test_ner_train_predict_is_ner_stream_tag_format_text_by_another_name(tmp_path):
    """`ner-train predict` is `ner-stream tag --format text`, with the same NER_STREAM_* variables
    (a worker's container, deploy/k8s's configmap)."""
    loaded = rigged_model()
    model = tmp_path / "rigged.nerm"
    save(model, loaded.model, loaded.info)
    text = tmp_path / "in.txt"
    text.write_text("Peter went to Paris .\n", encoding="utf-8")
    env = {"NER_STREAM_MODEL": str(model)}
    tagged = CliRunner().invoke(stream_cli.main, ["tag", "--format", "text", str(text)], env=env)
    predicted = CliRunner().invoke(train_cli.main, ["predict", str(text)], env=env)
    assert tagged.exit_code == 0 and predicted.exit_code == 0
    assert predicted.output == tagged.output


GMB_VAL = (
    "Sentence #,Word,POS,Tag\r\n"
    "Sentence: 1,Peter,NNP,B-per\r\n,went,VBD,O\r\n,to,TO,O\r\n,Paris,NNP,B-geo\r\n,.,.,O\r\n"
    "Sentence: 2,Paris,NNP,B-gpe\r\n,and,CC,O\r\n,the,DT,B-tim\r\n,.,.,O\r\n"
    "Sentence: 3,the,DT,B-org\r\n,Peter,NNP,I-org\r\n,.,.,O\r\n"
)


def test_evaluate_reports_an_out_of_domain_estimate_with_gmb_types_mapped(tmp_path):
    loaded = rigged_model()  # tags Peter as PER and Paris as LOC, nothing else
    model = tmp_path / "rigged.nerm"
    save(model, loaded.model, loaded.info)
    dev = tmp_path / "dev.txt"
    dev.write_text("Peter B-PER\nwent O\nto O\nParis B-LOC\n. O\n", encoding="utf-8")
    gmb = tmp_path / "val.csv"
    gmb.write_bytes(GMB_VAL.encode("latin-1"))
    args = ["evaluate", "--model", str(model), "--data", str(dev), "--out-of-domain", str(gmb)]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["f1"] == 100.0
    ood = report["out_of_domain"]
    assert ood["data"] == "val.csv"
    # Gold, mapped: PER (Peter), LOC (Paris, geo), LOC (Paris, gpe), ORG (the Peter); the time
    # expression counts as O. Predicted: Peter, Paris, Paris, and the Peter inside the ORG.
    assert (ood["gold"], ood["predicted"], ood["correct"]) == (4, 4, 3)
    assert ood["per_type"]["LOC"]["f1"] == 100.0
    assert ood["per_type"]["ORG"]["recall"] == 0.0
    table = CliRunner().invoke(main, args)
    assert "out of domain: val.csv, GMB types mapped to CoNLL's" in table.output


def test_out_of_domain_needs_a_conll_typed_model_and_no_raw(tmp_path):
    gmb = tmp_path / "val.csv"
    gmb.write_bytes(GMB_VAL.encode("latin-1"))
    loaded = random_model(tags=["O", "B-geo", "I-geo", "E-geo", "S-geo"])
    model = tmp_path / "gmb.nerm"
    save(model, loaded.model, loaded.info)
    args = ["evaluate", "--model", str(model), "--data", str(gmb), "--format", "gmb"]
    result = CliRunner().invoke(main, [*args, "--out-of-domain", str(gmb)])
    assert result.exit_code != 0 and "needs a CoNLL-typed model" in result.output
    raw = CliRunner().invoke(main, [*args, "--raw", "lines", "--out-of-domain", str(gmb)])
    assert raw.exit_code != 0 and "--out-of-domain" in raw.output


def test_evaluate_scores_an_upper_or_lower_cased_copy_of_the_data(tmp_path, monkeypatch):
    loaded = rigged_model()  # looks words up lowercased: its entities do not depend on case
    model = tmp_path / "rigged.nerm"
    save(model, loaded.model, loaded.info)
    dev = tmp_path / "dev.txt"
    dev.write_text("Peter B-PER\nwent O\nto O\nParis B-LOC\n. O\n", encoding="utf-8")
    args = ["evaluate", "--model", str(model), "--data", str(dev), "--json"]
    scored: list[list[str]] = []
    real = train_cli.evaluate_model

    def spy(model, vocabs, sentences, scheme, device):
        scored.append([t for s in sentences for t in s.tokens])
        return real(model, vocabs, sentences, scheme, device)

    monkeypatch.setattr(train_cli, "evaluate_model", spy)
    for casing in ("upper", "lower"):
        result = CliRunner().invoke(main, [*args, "--case", casing])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["f1"] == 100.0
    assert scored == [["PETER", "WENT", "TO", "PARIS", "."], ["peter", "went", "to", "paris", "."]]
    raw = CliRunner().invoke(main, [*args, "--case", "upper", "--raw", "lines"])
    assert raw.exit_code != 0 and "--case" in raw.output


def test_recased_changes_tokens_only():
    from training.datasets import Sentence
    from training.trainer import recased

    (upper,) = recased([Sentence(["Peter", "went", "to", "Paris"], ["B-PER", "O", "O", "B-LOC"])],
                       "upper")  # fmt: skip
    assert upper.tokens == ["PETER", "WENT", "TO", "PARIS"]
    assert upper.tags == ["B-PER", "O", "O", "B-LOC"]
    assert recased([upper], "lower")[0].tokens == ["peter", "went", "to", "paris"]
    with pytest.raises(ValueError):
        recased([upper], "title")
