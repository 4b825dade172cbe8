#!/usr/bin/env bash
# Fuzzes every parser that reads input from outside the agent (fuzz/fuzz_targets/, through
# init::fuzzing) with libFuzzer and AddressSanitizer, by cargo-fuzz.
#
#   scripts/fuzz.sh [SECONDS-PER-TARGET [TARGET...]]     default: 60 s, every target
#
# Stable Rust is enough: cargo-fuzz passes -Zsanitizer=address and the coverage passes, which only
# nightly accepts; RUSTC_BOOTSTRAP=1 lets the stable compiler accept them (the sanitizer runtime
# ships in rust-std for x86_64-unknown-linux-gnu), so no second toolchain is needed.
#
# Inputs that reach new code are added to fuzz/corpus/TARGET, minimised afterwards with `cargo fuzz
# cmin` (commit them: `cargo test` replays every corpus through the same entry points). A panic, a sanitizer report, an input taking over
# 10 s or a process over 1 GiB stops the run, leaves the input in fuzz/artifacts/TARGET/ and exits 1.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo/fuzz"
secs="${1:-60}"
shift || true
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io" >&2
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" >&2
fi
if (($# > 0)); then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi

export RUSTC_BOOTSTRAP=1
echo "fuzz: building ${#targets[@]} targets (sanitizer build; minutes the first time)" >&2
cargo fuzz build -O --debug-assertions >&2

status=0
printf '%-20s %10s %8s %8s %s\n' target runs cov corpus result
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$(mktemp)"
    if cargo fuzz run -O --debug-assertions "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=1024 \
        -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="FAILED: $(grep -m1 -E 'ERROR|panicked|Test unit written' "$log" || tail -n1 "$log")"
        status=1
        tail -n 40 "$log" >&2
    fi
    # Keep the committed corpus minimal: the smallest set of inputs with the same coverage
    # (not in CI's throwaway clone: FUZZ_NO_CMIN=1).
    if [[ -z "${FUZZ_NO_CMIN:-}" ]]; then
        cargo fuzz cmin -O --debug-assertions "$t" "corpus/$t" >/dev/null 2>&1 || true
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n1 | cut -d' ' -f2)
    printf '%-20s %10s %8s %8s %s\n' "$t" "${runs:-?}" "${cov:-?}" "$(find "corpus/$t" -type f | wc -l)" "$result"
    rm -f "$log"
done
exit "$status"
