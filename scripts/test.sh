#!/usr/bin/env bash
# THE test command: installs what the suite needs on a fresh Debian machine (idempotent, fast
# the second time), then runs the whole suite with real salt, real git and the real kernel.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

scripts/install-test-deps.sh
export PATH="$repo/.venv/bin:$PATH"

echo "== format and lints" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings

echo "== static stackless-init" >&2
STACKLESS_INIT_STATIC="$(scripts/build-init.sh | tail -1)"
export STACKLESS_INIT_STATIC

echo "== tests" >&2
cargo test --workspace --locked "$@"
