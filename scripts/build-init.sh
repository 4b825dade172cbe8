#!/usr/bin/env bash
# Builds the shipped stackless-init: fully static (musl), release profile tuned for size
# (Cargo.toml: LTO, one codegen unit, strip, panic=abort), for x86_64 and for aarch64 (Graviton).
#
#   scripts/build-init.sh                  the x86_64 agent (x86_64-unknown-linux-musl)
#   scripts/build-init.sh --arch aarch64   the arm64 agent (aarch64-unknown-linux-musl)
#   scripts/build-init.sh --arch all       both: aarch64 first, x86_64 last
#
# stdout is one path per binary built, x86_64 last, so BIN=$(scripts/build-init.sh | tail -1)
# is always the x86_64 agent, with or without --arch all. Sizes go to stderr.
# Each binary is checked: its ELF machine (readelf -h), static (no program interpreter, no
# shared library needed), and under the one size budget both arches share (scripts/test.sh,
# hence CI, builds both). The IMDS emulator (cargo feature `emulator`, with its HTTP server) is
# never built in.
#
# The aarch64 cross toolchain (clang-14 from Debian 12 for ring's C and assembly, rust-lld and
# Rust's self-contained musl to link) is installed when missing: scripts/aarch64-toolchain.sh.
# x86_64 is built as before: musl-gcc (Debian's musl-tools) for any C, the host's linker.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/aarch64-toolchain.sh
. "$repo/scripts/aarch64-toolchain.sh"

arch=x86_64
while (($#)); do
    case "$1" in
    --arch) arch="${2:-}"; shift 2 || { echo "build-init: --arch needs a value" >&2; exit 2; } ;;
    --arch=*) arch="${1#--arch=}"; shift ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-init: unknown argument $1 (usage: build-init.sh [--arch x86_64|aarch64|all])" >&2; exit 2 ;;
    esac
done
case "$arch" in
x86_64) arches=(x86_64) ;;
aarch64 | arm64) arches=(aarch64) ;;
all) arches=(aarch64 x86_64) ;; # x86_64 last: `tail -1` stays the x86_64 agent
*) echo "build-init: --arch $arch: expected x86_64, aarch64 (or arm64) or all" >&2; exit 2 ;;
esac

# The agent's size budget (docs/benchmarks.md), the same for every arch: 3 MiB.
# STACKLESS_INIT_BUDGET only for testing this check.
budget=${STACKLESS_INIT_BUDGET:-3145728}

ensure_target() {
    if ! rustup target list --installed 2>/dev/null | grep -qx "$1"; then
        rustup target add "$1" >&2
    fi
}

# std's source, which -Z build-std compiles (the same version as the toolchain's rustc).
if ! rustup component list --installed 2>/dev/null | grep -qx rust-src; then
    rustup component add rust-src >&2
fi

mib() { awk -v s="$1" 'BEGIN{printf "%.2f", s/1048576}'; }

build_one() { # arch -> prints the binary's path
    local a="$1" target machine bin size_flags
    case "$a" in
    x86_64)
        target=x86_64-unknown-linux-musl
        machine="Advanced Micro Devices X86-64"
        ensure_target "$target"
        # Any C the dependencies build must target musl too (Debian's musl-tools has the wrapper).
        if command -v musl-gcc >/dev/null; then
            export CC_x86_64_unknown_linux_musl="${CC_x86_64_unknown_linux_musl:-musl-gcc}"
        fi
        # For size (issue 18: under 2 MiB). LLVM's machine outliner, which AArch64 runs by
        # default at opt-level z and x86_64 does not (57 KB less), and rust-lld (shipped with
        # the toolchain, as aarch64 already links) for identical code folding: monomorphised
        # copies that compiled to the same bytes are kept once (16 KB less).
        size_flags="-C llvm-args=-enable-machine-outliner=always -Z unstable-options -C linker-flavor=gnu-lld-cc -C link-self-contained=+linker -C link-arg=-Wl,--icf=all"
        ;;
    aarch64)
        target=aarch64-unknown-linux-musl
        machine="AArch64"
        aarch64_toolchain
        # rust-lld is its linker already (scripts/aarch64-toolchain.sh); the outliner runs by
        # default at opt-level z.
        size_flags="-C link-arg=--icf=all"
        ;;
    esac

    # std itself is built for size too (`-Z build-std`, hence RUSTC_BOOTSTRAP: the prebuilt std
    # is tuned for speed and carries unwind tables), without unwind tables: with panic=abort they
    # only served backtraces, and they were 366 KB of the 2.97 MB agent. A panic still prints its
    # message and location. The flags are the target's, so they reach neither build scripts nor
    # the debug test builds (whose panic=unwind needs the tables); .cargo/config.toml's target
    # flags still apply (cargo joins them).
    # Added to any flags the caller set for the target, not in place of them.
    local flags_var
    flags_var="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
    (cd "$repo" && env RUSTC_BOOTSTRAP=1 "$flags_var=${!flags_var:-} -C force-unwind-tables=no $size_flags" \
        cargo build --quiet --release --locked --target "$target" -p init --bin stackless-init \
        -Z build-std=std,panic_abort -Z build-std-features=optimize_for_size >&2)
    bin="${CARGO_TARGET_DIR:-$repo/target}/$target/release/stackless-init"

    # The right machine: an agent for the wrong arch would only fail on the instance.
    local got
    got=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
    if [[ "$got" != "$machine" ]]; then
        echo "build-init: $bin is built for '$got', expected '$machine' ($target)" >&2
        exit 1
    fi
    # Static means no program interpreter and no shared library needed (x86_64 is static-pie,
    # so it has a dynamic section for its own relocations; aarch64 is a plain static EXEC).
    if readelf -l "$bin" | grep -q "Requesting program interpreter" ||
        readelf -d "$bin" | grep -q "(NEEDED)"; then
        echo "build-init: $bin is dynamically linked" >&2
        exit 1
    fi
    local size
    size=$(stat -c %s "$bin")
    echo "stackless-init: static $a binary, $size bytes ($(mib "$size") MiB), $bin" >&2
    if ((size > budget)); then
        echo "build-init: the $a stackless-init is $size bytes ($(mib "$size") MiB), over its budget of $budget bytes ($(mib "$budget") MiB) by $((size - budget)) bytes;" \
            "find what grew (a new dependency? a feature turned on?) before raising the budget" >&2
        exit 1
    fi
    echo "$bin"
}

for a in "${arches[@]}"; do
    build_one "$a"
done
