#!/usr/bin/env bash
# THE test command: installs what the suite needs on a fresh Debian machine (idempotent, fast
# the second time), then runs the whole suite with real salt, real git and the real kernel.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

scripts/install-test-deps.sh
scripts/install-local-deps.sh
export PATH="$repo/.venv/bin:$PATH"

echo "== format and lints" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings

echo "== static stackless-init, x86_64 and aarch64 (each under the size budget)" >&2
static_out="$(scripts/build-init.sh --arch all)"
mapfile -t static_bins <<<"$static_out"
STACKLESS_INIT_STATIC_AARCH64="${static_bins[0]}"
STACKLESS_INIT_STATIC="${static_bins[1]}"
export STACKLESS_INIT_STATIC STACKLESS_INIT_STATIC_AARCH64

echo "== tests" >&2
cargo test --workspace --locked "$@"

# The agent's engine as Graviton runs it: `init --lib` built for aarch64-unknown-linux-musl, run
# under qemu-aarch64-static as cargo's runner (no binfmt_misc needed). About 2.5 min to build
# and under 2 min to run on the 2-core machine.
echo "== the aarch64 agent: library tests under qemu-user (scripts/test-aarch64.sh)" >&2
scripts/test-aarch64.sh

# Every parser of outside input, coverage-guided with AddressSanitizer, a few seconds each from
# the committed corpora (about 5 minutes, most of it building cargo-fuzz and the sanitizer build;
# `scripts/fuzz.sh` alone runs longer). The builder's parsers are fuzzed inside `cargo test`.
echo "== fuzzing the agent's parsers, ${STACKLESS_CI_FUZZ_SECS:-5} s per target (scripts/fuzz.sh)" >&2
FUZZ_NO_CMIN=1 scripts/fuzz.sh "${STACKLESS_CI_FUZZ_SECS:-5}"

# The whole system on one machine: local bakes booted in qemu (minutes; STACKLESS_SKIP_E2E=1
# skips it while iterating).
if [[ -z "${STACKLESS_SKIP_E2E:-}" ]]; then
    echo "== end to end: bake locally, boot in qemu (tests/e2e-local.sh)" >&2
    # The builder binary `cargo test` built for the integration tests: a `cargo build -p
    # builder` here would build the AWS SDK a third time (its features differ from the
    # workspace's test build).
    BUILDER="$repo/target/debug/builder" tests/e2e-local.sh
fi
