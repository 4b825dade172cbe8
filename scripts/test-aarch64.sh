#!/usr/bin/env bash
# The agent's library tests built for aarch64-unknown-linux-musl and run under qemu-user
# (qemu-aarch64-static as cargo's runner, never binfmt_misc, which CI may not have).
# scripts/test.sh runs this as its own stage; extra arguments go to the test binary
# (a name filter, --skip NAME, --test-threads N).
#
# What runs: the unit tests of `init --lib`, the engine: the IMDS client against the emulator,
# user-data, the watchers on real inotify, the supervisord client against a real supervisord,
# the sync lock, the state record, git releases, SigV4 and TLS (ring's aarch64 assembly) against
# moto and botocore, salt's configuration and highstate parsing. Children they start (git,
# supervisord, salt-call, python) are the host's x86_64 programs: qemu-user hands their execve to
# the kernel. What does not run: init/tests/, which start the stackless-init binary itself as a
# child; an aarch64 child needs binfmt_misc.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/aarch64-toolchain.sh
. "$repo/scripts/aarch64-toolchain.sh"
aarch64_toolchain

runner=$(command -v qemu-aarch64-static || true)
[[ -n "$runner" ]] || {
    echo "test-aarch64: no qemu-aarch64-static (scripts/install-test-deps.sh installs qemu-user-static)" >&2
    exit 1
}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER="$runner"

cargo test --locked --target "$aarch64_target" -p init --lib -- "$@"
