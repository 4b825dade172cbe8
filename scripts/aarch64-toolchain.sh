# shellcheck shell=bash
# Sourced (scripts/build-init.sh, scripts/test-aarch64.sh): the pinned cross toolchain for
# aarch64-unknown-linux-musl on an x86_64 Debian 12 machine, installed when missing (as root):
#   - the Rust standard library for the target (rustup target add);
#   - Debian 12's clang-14 and llvm-14 (llvm-ar): ring (rustls) compiles C and assembly, which
#     clang does for any target with --target=aarch64-linux-musl (it needs only its own headers);
#   - the linker is rust-lld, shipped with the Rust toolchain (rustc finds it in its sysroot);
#     musl's crt objects and libc.a come from Rust's self-contained musl target.
# No gcc cross compiler, no musl headers, nothing from outside crates.io, PyPI and Debian.
# The major version is the pin: bookworm ships clang 14 only, updated by Debian's point releases.
aarch64_target=aarch64-unknown-linux-musl
aarch64_clang=clang-14
aarch64_ar=llvm-ar-14

aarch64_toolchain() {
    if ! rustup target list --installed 2>/dev/null | grep -qx "$aarch64_target"; then
        rustup target add "$aarch64_target" >&2
    fi
    local missing=() p
    for p in "$aarch64_clang" llvm-14; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "aarch64 toolchain: apt-get install ${missing[*]} (the C compiler for ring)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    export CC_aarch64_unknown_linux_musl="${CC_aarch64_unknown_linux_musl:-$aarch64_clang}"
    export CFLAGS_aarch64_unknown_linux_musl="${CFLAGS_aarch64_unknown_linux_musl:---target=aarch64-linux-musl}"
    export AR_aarch64_unknown_linux_musl="${AR_aarch64_unknown_linux_musl:-$aarch64_ar}"
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER="${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER:-rust-lld}"
}
