#!/usr/bin/env bash
# Builds the shipped stackless-init: fully static (x86_64-unknown-linux-musl), release profile
# tuned for size (Cargo.toml: LTO, one codegen unit, strip, panic=abort). Prints the binary's
# path and size; the path is the last line of stdout, so BIN=$(scripts/build-init.sh | tail -1).
# Fails when the binary is over its 3 MiB budget (scripts/test.sh, hence CI, runs this).
# The IMDS emulator (cargo feature `emulator`, with its HTTP server) is never built in.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
target=x86_64-unknown-linux-musl

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target" >&2
fi
# Any C the dependencies build must target musl too (Debian's musl-tools has the wrapper).
if command -v musl-gcc >/dev/null; then
    export CC_x86_64_unknown_linux_musl="${CC_x86_64_unknown_linux_musl:-musl-gcc}"
fi

cd "$repo"
cargo build --quiet --release --locked --target "$target" -p init --bin stackless-init >&2
bin="${CARGO_TARGET_DIR:-$repo/target}/$target/release/stackless-init"

# Static means no program interpreter and no dynamic section.
if readelf -l "$bin" | grep -q "Requesting program interpreter"; then
    echo "build-init: $bin is dynamically linked" >&2
    exit 1
fi
size=$(stat -c %s "$bin")
mib() { awk -v s="$1" 'BEGIN{printf "%.2f", s/1048576}'; }
echo "stackless-init: static x86_64 binary, $size bytes ($(mib "$size") MiB)" >&2
# The agent's size budget (docs/benchmarks.md): 3 MiB. STACKLESS_INIT_BUDGET only for testing this check.
budget=${STACKLESS_INIT_BUDGET:-3145728}
if ((size > budget)); then
    echo "build-init: stackless-init is $size bytes ($(mib "$size") MiB), over its budget of $budget bytes ($(mib "$budget") MiB) by $((size - budget)) bytes;" \
        "find what grew (a new dependency? a feature turned on?) before raising the budget" >&2
    exit 1
fi
echo "$bin"
