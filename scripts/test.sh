#!/usr/bin/env bash
# THE test command: installs what the suite needs on a fresh Debian machine (idempotent, fast
# the second time), then runs the whole suite with real salt, real git and the real kernel.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

# Each stage says how much disk is left where the build goes: a CI machine that ran out of disk
# while linking showed only a linker's "No space left on device".
stage() {
    local dir="${CARGO_TARGET_DIR:-$repo/target}"
    mkdir -p "$dir"
    echo "== $(date -u +%H:%M:%S) $1 ($(df -h --output=avail "$dir" | tail -1 | tr -d ' ') free for $dir)" >&2
}

scripts/install-test-deps.sh
scripts/install-local-deps.sh
export PATH="$repo/.venv/bin:$PATH"

stage "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings

stage "static stackless-init, x86_64 and aarch64 (each under the size budget)"
static_out="$(scripts/build-init.sh --arch all)"
mapfile -t static_bins <<<"$static_out"
STACKLESS_INIT_STATIC_AARCH64="${static_bins[0]}"
STACKLESS_INIT_STATIC="${static_bins[1]}"
export STACKLESS_INIT_STATIC STACKLESS_INIT_STATIC_AARCH64

stage "tests"
cargo test --workspace --locked "$@"

# The agent's engine as Graviton runs it: `init --lib` built for aarch64-unknown-linux-musl, run
# under qemu-aarch64-static as cargo's runner (no binfmt_misc needed). About 2.5 min to build
# and under 2 min to run on the 2-core machine.
stage "the aarch64 agent: library tests under qemu-user (scripts/test-aarch64.sh)"
scripts/test-aarch64.sh

# Every parser of outside input, coverage-guided with AddressSanitizer, a few seconds each from
# the committed corpora (about 5 minutes, most of it building cargo-fuzz and the sanitizer build;
# `scripts/fuzz.sh` alone runs longer). The builder's parsers are fuzzed inside `cargo test`.
stage "fuzzing the agent's parsers, ${STACKLESS_CI_FUZZ_SECS:-5} s per target (scripts/fuzz.sh)"
FUZZ_NO_CMIN=1 scripts/fuzz.sh "${STACKLESS_CI_FUZZ_SECS:-5}"

# The whole system on one machine: local bakes booted in qemu (minutes; STACKLESS_SKIP_E2E=1
# skips it while iterating).
if [[ -z "${STACKLESS_SKIP_E2E:-}" ]]; then
    stage "end to end: bake locally, boot in qemu (tests/e2e-local.sh)"
    # The builder binary `cargo test` built for the integration tests: a `cargo build -p
    # builder` here would build the AWS SDK a third time (its features differ from the
    # workspace's test build).
    BUILDER="$repo/target/debug/builder" tests/e2e-local.sh
fi
