#!/usr/bin/env bash
# Creates (or confirms) $REPO/.venv-pinned: our package (editable, with its test extra) on the stack
# optimum-neuron 0.4.5 pins (diffusers 0.35, transformers 4.57, huggingface_hub 0.36, peft 0.17, accelerate),
# on the same CPU torch 2.13.0 as the latest stack, so `make test` runs the suite on both.
#
# Idempotent, as tests/conformance/setup_env.sh: a stamp in the venv holds a hash of both constraint files'
# pins, pyproject.toml, this script and the base interpreter's version; when it matches nothing is done.
# Environment: PYTHON (base interpreter, default python3), PINNED_VENV (default $REPO/.venv-pinned).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${PINNED_VENV:-$REPO/.venv-pinned}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS=("$REPO/tests/conformance/constraints.txt" "$HERE/constraints.txt")
STAMP="$VENV/.pinned-stamp"

base_version="$("$PYTHON" -c 'import sys; print(sys.version)')"
want="$( { grep -hv '^[[:space:]]*#' "${CONSTRAINTS[@]}"; cat "$REPO/pyproject.toml" "${BASH_SOURCE[0]}";
           echo "$base_version"; } | sha256sum | cut -d' ' -f1)"

complete() { [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; }

if complete; then
    exit 0
fi

# One builder at a time (two `make test` started together): the second waits, then finds it complete.
mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null; then
    exec 9>"$VENV.lock"
    flock 9
    if complete; then
        exit 0
    fi
fi
if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" ]]; then
    echo "setup_env.sh: $VENV exists and is not a virtualenv; refusing to replace it" >&2
    exit 1
fi

start=$SECONDS
echo "setup_env.sh: creating $VENV (the suite's second stack: optimum-neuron 0.4.5's pins)" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)
# torch first and pinned: letting pip resolve it downloads the CUDA build.
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install "${CONSTRAINTS[@]/#/--constraint=}" --constraint=<(echo "torch==2.13.0") \
    -e "$REPO[test]" accelerate
"$VENV/bin/python" -m pip freeze --all > "$VENV/pinned-freeze.txt"
echo "$want" > "$STAMP"
echo "setup_env.sh: $VENV ready in $((SECONDS - start)) s" >&2
