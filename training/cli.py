"""`ner-train`: train the tagger from labelled corpora, evaluate it, and try it on text."""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import torch

from ner_stream import __version__
from ner_stream.checkpoint import CheckpointError, default_model_path, load, save
from ner_stream.cli import setting_option, tag_streams
from ner_stream.config import WorkerConfig
from ner_stream.model import ARCHS, CHAR_ENCODERS
from ner_stream.precision import PRECISIONS, PrecisionCheck, with_check
from ner_stream.spans import SCHEMES
from ner_stream.tagger import TaggerOptions, resolve_device
from ner_stream.text import LINE_BREAK_MODES
from training.datasets import FORMATS, DatasetError, load_corpus, read_conll_documents
from training.embeddings import load_embeddings
from training.evaluate import GMB_TO_CONLL, UNMAPPED_PREDICTIONS, format_report
from training.raw_evaluation import format_raw_report, raw_evaluation
from training.raw_text import LAYOUTS, paragraph_groups
from training.trainer import (
    CASINGS,
    DEFAULT_MODEL_NAME,
    OPTIMIZERS,
    TrainConfig,
    evaluate_model,
    fingerprint,
    out_of_domain_report,
    precision_check,
    recased,
    train,
)


def _load_model(path: Path | None):
    try:
        return load(path or default_model_path())
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None


def _read(path: Path, fmt: str):
    try:
        return load_corpus(path, fmt)
    except DatasetError as e:
        raise click.ClickException(str(e)) from None


def _merge_groups(path: Path) -> list[list[int]]:
    """`paragraph_groups` of every document of a CoNLL file, as indices into its sentences."""
    groups: list[list[int]] = []
    offset = 0
    for document in read_conll_documents(path):
        groups.extend([offset + i for i in group] for group in paragraph_groups(document))
        offset += len(document)
    return groups


def _portable_command(args: list[str]) -> str:
    """The command line with data paths cut to their file names (no machine paths in models)."""
    out = ["ner-train"]
    for i, arg in enumerate(args):
        is_path = i > 0 and args[i - 1] in ("--train", "--dev", "--embeddings", "--out")
        out.append(Path(arg).name if is_path else arg)
    return " ".join(out)


def _progress(batches: Iterator, total: int, label: str, status: Callable[[], str]) -> Iterator:
    """A progress bar over one epoch's batches: running loss, tokens/s, best dev F1 so far."""
    with click.progressbar(
        batches, length=total, label=label, file=sys.stderr, item_show_func=lambda _: status()
    ) as bar:
        yield from bar


def _device(name: str) -> torch.device:
    """The torch device for --device, or a usage error naming the flag."""
    try:
        return resolve_device(name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None


def _scoring_options(func):
    """--model, --data, --format and --device: the options of the commands that score a model."""
    options = [
        click.option(
            "--model",
            "model_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Model file (default: the packaged English model).",
        ),
        click.option(
            "--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
        ),
        click.option(
            "--format", "fmt", type=click.Choice(FORMATS), default="conll", show_default=True
        ),
        click.option("--device", default=TrainConfig.device, show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ner-train")
def main() -> None:
    """Train and evaluate ner-stream taggers."""


@main.command("train")
@click.option(
    "--train",
    "train_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Training corpus.",
)
@click.option(
    "--dev",
    "dev_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Development corpus (early stopping, reported figures).",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="conll", show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), default=TrainConfig.arch, show_default=True)
@click.option(
    "--embeddings",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="GloVe/word2vec text file (.gz accepted).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Model file to write.",
)
@click.option(
    "--name", default=DEFAULT_MODEL_NAME, show_default=True, help="Model name stored in the file."
)
@click.option("--model-version", default=__version__, show_default=True)
# Each default below that is a TrainConfig field is read from TrainConfig (one place for it).
@click.option("--epochs", type=click.IntRange(1), default=TrainConfig.epochs, show_default=True)
@click.option(
    "--batch-size", type=click.IntRange(1, 4096), default=TrainConfig.batch_size, show_default=True
)
@click.option(
    "--lr", type=click.FloatRange(0, min_open=True), default=TrainConfig.lr, show_default=True
)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=TrainConfig.optimizer,
    show_default=True,
    help="adam, or sgd with --momentum (Ma and Hovy: --batch-size 10 --lr 0.015).",
)
@click.option(
    "--momentum",
    type=click.FloatRange(0, 1, max_open=True),
    default=TrainConfig.momentum,
    show_default=True,
    help="With --optimizer sgd.",
)
@click.option("--patience", type=click.IntRange(1), default=TrainConfig.patience, show_default=True)
@click.option(
    "--hidden",
    type=click.IntRange(1),
    default=TrainConfig.hidden,
    show_default=True,
    help="LSTM units (per direction).",
)
@click.option(
    "--word-dim",
    type=click.IntRange(1),
    default=TrainConfig.word_dim,
    show_default=True,
    help="Without --embeddings.",
)
@click.option(
    "--char-encoder",
    type=click.Choice(CHAR_ENCODERS),
    default=TrainConfig.char_encoder,
    show_default=True,
)
@click.option(
    "--dropout",
    type=click.FloatRange(0, 1, max_open=True),
    default=TrainConfig.dropout,
    show_default=True,
)
@click.option(
    "--tag-scheme",
    type=click.Choice(SCHEMES),
    default=TrainConfig.tag_scheme,
    show_default=True,
    help="Scheme the model predicts in.",
)
@click.option(
    "--lowercase/--cased",
    default=TrainConfig.lowercase,
    help="Word lookup (default: lowercase for bilstm-crf, cased for lstm).",
)
@click.option(
    "--bidirectional/--unidirectional",
    default=TrainConfig.bidirectional,
    help="LSTM direction (default: bi for bilstm-crf, uni for lstm).",
)
@click.option(
    "--paragraph-merge",
    type=click.FloatRange(0, 1),
    default=TrainConfig.paragraph_merge,
    show_default=True,
    help="conll only: chance per epoch that sentences the raw-text path reads as one sequence "
    "(a headline and its dateline, table rows) are trained as one; 0 turns it off.",
)
@click.option(
    "--word-dropout",
    type=click.FloatRange(0, 1, max_open=True),
    default=TrainConfig.word_dropout,
    show_default=True,
    help="Chance that a training word is replaced by <UNK> (a number by its digit form).",
)
@click.option(
    "--singleton-unk",
    type=click.FloatRange(0, 1),
    default=TrainConfig.singleton_unk,
    show_default=True,
    help="Added chance of that for words seen once in the training data.",
)
@click.option(
    "--case-augment",
    type=click.FloatRange(0, 0.5),
    default=TrainConfig.case_augment,
    show_default=True,
    help="Chance per sentence and epoch that it is trained ALL-CAPS, and again lowercase.",
)
@click.option(
    "--freeze-pretrained/--fine-tune-pretrained",
    default=TrainConfig.freeze_pretrained,
    show_default=True,
    help="Keep the --embeddings vectors as they are (only words without one learn).",
)
@click.option(
    "--average-last",
    type=click.IntRange(1),
    default=TrainConfig.average_last,
    show_default=True,
    help="Write the mean of the weights of this many epochs ending at the best one (and the "
    "best epoch's own weights beside it, as OUT with .best-epoch before its suffix).",
)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--device", default=TrainConfig.device, show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for torch.")
@click.option(
    "--max-minutes",
    type=click.FloatRange(0, min_open=True),
    default=TrainConfig.max_minutes,
    help="Stop before this much training time.",
)
def train_cmd(
    train_path,
    dev_path,
    fmt,
    arch,
    embeddings,
    out,
    name,
    model_version,
    epochs,
    batch_size,
    lr,
    optimizer,
    momentum,
    patience,
    hidden,
    word_dim,
    char_encoder,
    dropout,
    tag_scheme,
    lowercase,
    bidirectional,
    paragraph_merge,
    word_dropout,
    singleton_unk,
    case_augment,
    freeze_pretrained,
    average_last,
    seed,
    device,
    threads,
    max_minutes,
) -> None:  # noqa: E501
    """Train a tagger; keep the epoch with the best dev entity F1."""
    if threads:
        torch.set_num_threads(threads)
    train_device = _device(device)
    started = time.monotonic()
    train_sents, dev_sents = _read(train_path, fmt), _read(dev_path, fmt)
    click.echo(f"train: {len(train_sents)} sentences, dev: {len(dev_sents)} sentences", err=True)
    vectors = load_embeddings(embeddings) if embeddings else None
    cfg = TrainConfig(
        arch=arch, tag_scheme=tag_scheme, epochs=epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, momentum=momentum, patience=patience, seed=seed, device=device,
        word_dim=word_dim, char_encoder=char_encoder, hidden=hidden, dropout=dropout,
        max_minutes=max_minutes, lowercase=lowercase, bidirectional=bidirectional,
        paragraph_merge=paragraph_merge, word_dropout=word_dropout, singleton_unk=singleton_unk,
        case_augment=case_augment, freeze_pretrained=freeze_pretrained, average_last=average_last,
    )  # fmt: skip
    groups = _merge_groups(train_path) if fmt == "conll" and paragraph_merge > 0 else []
    result = train(
        train_sents,
        dev_sents,
        cfg,
        embeddings=vectors,
        name=name,
        version=model_version,
        data_fingerprint=fingerprint([train_path, dev_path]),
        log=lambda line: click.echo(line, err=True),
        progress=_progress if sys.stderr.isatty() else None,
        merge_groups=groups,
    )
    result.info.metrics["total_seconds"] = round(time.monotonic() - started, 1)
    result.info.extra["train_command"] = _portable_command(sys.argv[1:])
    # Measured once here, so that a worker may run the model in bf16 where that pays (see
    # `ner-stream run --precision`).
    check = _check_precision(result.model, result.info, dev_sents, "bf16", train_device, dev_path)
    if check is not None:
        result.info.extra = with_check(result.info.extra, check)
    out.parent.mkdir(parents=True, exist_ok=True)
    save(out, result.model, result.info)
    if result.best_epoch_state is not None:
        # Kept so that averaging can be compared with the best epoch on other data too.
        single = copy.deepcopy(result.model)
        single.load_state_dict(result.best_epoch_state)
        best_path = out.with_name(f"{out.stem}.best-epoch{out.suffix}")
        info = copy.deepcopy(result.info)
        info.metrics = {"dev_f1": result.info.metrics["best_epoch_dev_f1"]}
        save(best_path, single, info)
        click.echo(f"wrote {best_path} (the best epoch, not averaged)", err=True)
    report = result.best_report
    assert report is not None
    click.echo(format_report(report, result.info.metrics["dev"]["accuracy"]))
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", err=True)


@main.command("evaluate")
@_scoring_options
@click.option(
    "--raw",
    "layout",
    type=click.Choice(LAYOUTS),
    help="Score the raw-text path instead: each -DOCSTART- document written out in this layout "
    "(lines: a sentence per line; paragraph: joined by spaces; wrapped: paragraph wrapped at 72 "
    "columns), tagged as `ner-stream run` tags a message, scored on entity character spans.",
)
@click.option(
    "--line-breaks",
    type=click.Choice(LINE_BREAK_MODES),
    help=f"With --raw: the worker's --line-breaks setting [default: {WorkerConfig.line_breaks}].",
)
@click.option(
    "--out-of-domain",
    "ood_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also score a CoNLL-typed model on this GMB-format file (e.g. GMB's val.csv), its "
    "types mapped: per -> PER, geo and gpe -> LOC, org -> ORG, other GMB types as O, predicted "
    "MISC ignored. Reported beside the --data scores.",
)
@click.option(
    "--case",
    "casing",
    type=click.Choice(CASINGS),
    default="as-is",
    show_default=True,
    help="Score a copy of --data with every token upper- or lower-cased (ALL-CAPS headlines and "
    "lowercased feeds): how much the model leans on capitals.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate_cmd(
    model_path, data, fmt, device, layout, line_breaks, ood_path, casing, as_json
) -> None:
    """Entity P/R/F1 per type (conlleval rules) and masked token accuracy on labelled data.

    With --raw LAYOUT the documents go through the worker's text path (tokenizer, sentence
    splitting, windows, tagger) as raw text, and the report adds the token-level F1 of the same
    data, the kinds of error and the entities that cross a line break.
    """
    if layout is None and line_breaks is not None:
        raise click.BadParameter("applies to --raw only", param_hint="--line-breaks")
    if layout is not None and ood_path is not None:
        raise click.BadParameter("does not apply with --raw", param_hint="--out-of-domain")
    if layout is not None and casing != "as-is":
        raise click.BadParameter("does not apply with --raw", param_hint="--case")
    loaded = _load_model(model_path)
    dev = _device(device)
    if layout is None:
        sentences = recased(_read(data, fmt), casing)
        model, vocabs, scheme = (
            loaded.model.to(dev),
            loaded.info.vocabs,
            loaded.info.config.tag_scheme,
        )
        if ood_path is not None:
            types = {t.partition("-")[2] for t in vocabs.tags.itos} - {""}
            conll = set(GMB_TO_CONLL.values())
            if not types & conll or not types <= conll | UNMAPPED_PREDICTIONS:
                raise click.ClickException(
                    "--out-of-domain needs a CoNLL-typed model (PER, LOC, ORG, MISC); this one "
                    f"tags {', '.join(sorted(types))}"
                )
        report, accuracy = evaluate_model(model, vocabs, sentences, scheme, dev)
        ood = None
        if ood_path is not None:
            ood = out_of_domain_report(model, vocabs, _read(ood_path, "gmb"), scheme, dev)
        if as_json:
            out = {**report.to_dict(), "accuracy": accuracy}
            if ood is not None:
                out["out_of_domain"] = {"data": ood_path.name, **ood.to_dict()}
            click.echo(json.dumps(out, indent=2))
        else:
            click.echo(format_report(report, accuracy))
            if ood is not None:
                click.echo(f"\nout of domain: {ood_path.name}, GMB types mapped to CoNLL's")
                click.echo(format_report(ood))
        return
    if fmt != "conll":
        raise click.BadParameter(
            "--raw needs --format conll: only CoNLL files mark documents (-DOCSTART-)",
            param_hint="--raw",
        )
    try:
        documents = read_conll_documents(data)
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    result = raw_evaluation(loaded, documents, layout, line_breaks or WorkerConfig.line_breaks, dev)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_raw_report(result))


def _check_precision(
    model, info, sentences, precision: str, device: torch.device, data: Path
) -> PrecisionCheck | None:
    """`precision_check` with its result echoed; None (and a note) where the device cannot."""
    try:
        check = precision_check(
            model, info.vocabs, sentences, info.config.tag_scheme, device, precision,
            data.name, fingerprint([data]).removeprefix("sha256:"),
        )  # fmt: skip
    except RuntimeError as e:
        click.echo(f"{precision} not measured on {device}: {e}", err=True)
        return None
    click.echo(
        f"dev F1 {check.fp32_f1:.2f} at fp32, {check.f1:.2f} at {precision} "
        f"({check.change:+.2f}) on {check.data}, {check.sentences} sentences, {check.device}",
        err=True,
    )
    return check


@main.command("check-precision")
@_scoring_options
@click.option("--precision", type=click.Choice(["bf16", "fp16"]), default="bf16", show_default=True)
@click.option("--write", is_flag=True, help="Record the result in the model file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_precision_cmd(model_path, data, fmt, precision, device, write, as_json) -> None:
    """Dev F1 at fp32 and at a reduced precision, on the same data and device.

    With --write the result goes into the model file, where `ner-stream run --precision` reads
    it: a reduced precision is used only when F1 moved by at most --max-f1-change.
    """
    path = model_path or default_model_path()
    loaded = _load_model(path)
    sentences = _read(data, fmt)
    dev = _device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise click.BadParameter("fp16 runs only on CUDA", param_hint="--precision")
    check = _check_precision(loaded.model, loaded.info, sentences, precision, dev, data)
    if check is None:
        raise click.ClickException(f"{precision} could not run on {dev}")
    if as_json:
        click.echo(json.dumps({**check.to_dict(), "change": round(check.change, 4)}, indent=2))
    if write:
        fresh = _load_model(path)  # the file's own weights, untouched by the measurement
        fresh.info.extra = with_check(fresh.info.extra, check)
        save(path, fresh.model, fresh.info)
        click.echo(f"recorded in {path}", err=True)


@main.command("predict")
@setting_option("model", type=click.Path(dir_okay=False, path_type=Path))
@setting_option("device")
@setting_option("precision", type=click.Choice(PRECISIONS))
@setting_option("max_f1_change", type=click.FloatRange(0))
@setting_option("line_breaks", type=click.Choice(LINE_BREAK_MODES))
@click.argument("inputs", nargs=-1, type=click.File("rb"))
def predict_cmd(model, device, precision, max_f1_change, line_breaks, inputs) -> None:
    """Tag text lines (from files or stdin): `ner-stream tag --format text`, by another name.

    One JSON object per line, {"id": the line's number, "entities": [...]}. The options, their
    defaults and their NER_STREAM_* variables are `ner-stream tag`'s.
    """
    options = TaggerOptions(
        device=device, precision=precision, max_f1_change=max_f1_change, line_breaks=line_breaks
    )
    tag_streams(model, options, inputs, fmt="text", max_doc_bytes=WorkerConfig.max_doc_bytes)


if __name__ == "__main__":
    main()
