#!/usr/bin/env bash
# The package as users install it. Builds the wheel, installs it (not editable) in a fresh virtual environment outside
# the source tree, beside the OLDEST transformers llmquant supports (the test suite runs under the newest), and from
# an empty folder: writes the demo recipe with `llmquant init demo`, runs it end to end (its lm-eval tasks included),
# evaluates the export on an offline task with `llmquant eval`, then runs the compatibility tests (pytest -m compat)
# against the installed package.
#   scripts/wheel_check.sh                  # what CI runs after `make test`
#   TRANSFORMERS=5.25.0 scripts/wheel_check.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
OLDEST="$(sed -n 's/^OLDEST = "\(.*\)"/\1/p' "$ROOT/llmquant/compat.py")"
TRANSFORMERS="${TRANSFORMERS:-$OLDEST.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llmquant-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "build the wheel"
cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/"  # the tests (and their settings) of the sources the wheel is built from
"$PYTHON" -m build --wheel --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/llmquant-*.whl)"
echo "$WHEEL"

step "install it with transformers $TRANSFORMERS in a fresh environment"
"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" $TORCH  # first, so nothing pulls another build
# the suite's pins, but for transformers and what each transformers release pins itself
grep -v -i '^\(transformers\|huggingface_hub\|tokenizers\)==' "$ROOT/constraints.txt" >"$WORK/constraints.txt"
"${PIP[@]}" -c "$WORK/constraints.txt" "$WHEEL" "transformers==$TRANSFORMERS" pytest
BIN="$WORK/venv/bin"

step "the demo from an empty folder"
mkdir "$WORK/empty" && cd "$WORK/empty"
"$BIN/python" -c "import llmquant, transformers; print('llmquant', llmquant.__version__, 'from', llmquant.__file__, '| transformers', transformers.__version__)"
"$BIN/llmquant" init demo > r.yaml
"$BIN/llmquant" run r.yaml --quiet
"$BIN/llmquant" eval out/demo --text asset:botchan --range 0.6 1.0 --seqlen 256 --max-tokens 1024 \
    --tasks botchan_cloze --task-limit 10 --output eval --quiet
"$BIN/python" - <<'PY'
import json
demo = json.load(open("out/demo/results.json"))
tasks = demo["models"]["quantized"]["tasks"]
assert set(tasks) == {"botchan_cloze", "botchan_continuation"}, tasks
(model,) = json.load(open("eval/results.json"))["models"].values()
assert 0 <= model["tasks"]["botchan_cloze"]["acc"] <= 1 and model["perplexity"] > 1, model
print("demo export, its tasks and a separate eval: ok")
PY

step "compatibility tests against the installed package"
"$BIN/pytest" -m compat -q -p no:cacheprovider --rootdir="$WORK" -c "$WORK/pyproject.toml" "$WORK/tests"
step "done"
