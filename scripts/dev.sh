#!/usr/bin/env bash
# Set-up and run in one step on a fresh machine:
#   scripts/dev.sh serve   creates .venv, installs bnserve, starts the API (+1 training worker) with
#                          the demo model on http://127.0.0.1:8000
#   scripts/dev.sh test    creates .venv, installs bnserve with its dev tools, runs ruff, mypy, pytest
#   scripts/dev.sh bench   creates .venv, installs bnserve with LitServe, runs bench/serving.py
#   scripts/dev.sh install [EXTRAS]   only the set-up, e.g. `install "[postgres]"`: the
#                          Dockerfile's install step, so the image is built by this same recipe
# PyTorch comes first and pinned (TORCH_SPEC, default torch==2.13.0): the project's range would
# otherwise let pip fetch a multi-GB CUDA build. TORCH_INDEX_URL, when set, is the index PyTorch
# alone comes from (the Dockerfile's CPU or CUDA wheels). VENV picks the environment's folder.
# Extra arguments go to `python -m service` (the same options as `bnserve serve`: --port,
# --workers, ...; --help lists them) / pytest / the bench.
# Set-up prints one line per step on stderr; pip's own output only when a step fails.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys, venv; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "installing Python 3.11+ with apt-get" >&2
    apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip >&2
    echo python3
}

step() {
    echo "==> $*" >&2
}

# Run a quiet pip step; on failure show what pip said (kept in a log while it runs).
pip_step() {
    local log
    log="$(mktemp)"
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "==> failed: pip install $*" >&2
        exit 1
    fi
    rm -f "$log"
}

setup() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        step "creating the virtual environment $VENV"
        "$(find_python)" -m venv "$VENV"
    fi
    # Reinstall only when what we install changed.
    local stamp="$VENV/.bnserve-installed"
    local want
    want="$TORCH_SPEC ${TORCH_INDEX_URL:-} $extras $(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        local torch_index=()
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            torch_index=(--index-url "$TORCH_INDEX_URL")
        fi
        step "upgrading pip"
        pip_step --upgrade pip
        step "installing PyTorch ($TORCH_SPEC; the first time takes a minute or two)"
        pip_step ${torch_index[@]+"${torch_index[@]}"} "$TORCH_SPEC"
        step "installing bnserve$extras and its dependencies"
        pip_step -e ".$extras"
        echo "$want" > "$stamp"
        step "installed; $VENV/bin/bnserve --help lists the commands"
    fi
}

command="${1:-}"
shift || true
case "$command" in
    serve)
        setup "[postgres]"
        step "starting the server: python -m service $*"
        exec "$VENV/bin/python" -m service "$@"
        ;;
    test)
        setup "[dev]"
        step "ruff, mypy, then pytest"
        "$VENV/bin/ruff" check service models tests bench
        "$VENV/bin/ruff" format --check service models tests bench
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    install)
        setup "${1:-}"
        ;;
    bench)
        setup "[bench]"
        exec "$VENV/bin/python" bench/serving.py "$@"
        ;;
    *)
        echo "usage: scripts/dev.sh serve|test|bench|install [args]" >&2
        exit 2
        ;;
esac
