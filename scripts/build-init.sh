#!/usr/bin/env bash
# Builds the shipped stackless-init: fully static (x86_64-unknown-linux-musl), release profile
# tuned for size (Cargo.toml: LTO, one codegen unit, strip, panic=abort). Prints the binary's
# path and size; the path is the last line of stdout, so BIN=$(scripts/build-init.sh | tail -1).
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
bin="$repo/target/$target/release/stackless-init"

# Static means no program interpreter and no dynamic section.
if readelf -l "$bin" | grep -q "Requesting program interpreter"; then
    echo "build-init: $bin is dynamically linked" >&2
    exit 1
fi
size=$(stat -c %s "$bin")
echo "stackless-init: static x86_64 binary, $size bytes ($(awk -v s="$size" 'BEGIN{printf "%.2f", s/1048576}') MiB)" >&2
echo "$bin"
