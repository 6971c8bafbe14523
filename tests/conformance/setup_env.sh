#!/usr/bin/env bash
# Creates (or confirms) the conformance virtualenv $REPO/.venv-conformance: optimum-neuron 0.4.5 with
# its diffusion extras, on torch 2.13.0, pinned by tests/conformance/constraints.txt. Our own package is
# deliberately NOT installed there: the venv only runs optimum-neuron's code, which judges our exports
# (see tests/conformance/optimum_runner.py).
#
# Idempotent: a stamp file in the venv holds a hash of constraints.txt's pins, this script and the base
# interpreter's version; when it matches, nothing is done (well under a second). Otherwise the venv is
# rebuilt from scratch and the stamp written last, so an interrupted build is redone on the next run.
# Environment: PYTHON (base interpreter, default python3), CONFORMANCE_VENV (default $REPO/.venv-conformance).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${CONFORMANCE_VENV:-$REPO/.venv-conformance}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$HERE/constraints.txt"
STAMP="$VENV/.conformance-stamp"

base_version="$("$PYTHON" -c 'import sys; print(sys.version)')"
# Comment lines of constraints.txt do not count (editing a note does not rebuild the venv).
want="$( { grep -v '^[[:space:]]*#' "$CONSTRAINTS"; cat "${BASH_SOURCE[0]}"; echo "$base_version"; } \
         | sha256sum | cut -d' ' -f1)"

complete() { [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; }

if complete; then
    exit 0
fi

# One builder at a time (two `make install` started together): the second waits, then finds it complete.
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
echo "setup_env.sh: creating $VENV (optimum-neuron 0.4.5 for the conformance tests)" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)
# torch first and pinned: letting pip resolve it downloads the CUDA build.
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install --constraint "$CONSTRAINTS" "optimum-neuron[diffusers]==0.4.5"
"$VENV/bin/python" -m pip freeze --all > "$VENV/conformance-freeze.txt"
echo "$want" > "$STAMP"
echo "setup_env.sh: $VENV ready in $((SECONDS - start)) s" >&2
