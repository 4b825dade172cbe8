#!/usr/bin/env bash
# The quickstart: the whole of stackless on one Debian 12 machine, no AWS account. As root, it
#   1. installs what is missing (debootstrap, qemu from bookworm-backports, the musl target),
#   2. builds stackless-init (static) and builder,
#   3. bakes the `preseeded` image locally (debootstrap, the same provisioning as on AWS, qcow2),
#   4. serves the example salt and config repositories (examples/) from a git daemon on loopback,
#   5. boots the image in qemu with the example user-data, served by the IMDS emulator,
#   6. prints the agent's boot timeline and asks the example web program for its greeting.
# With --keep-running the machine stays up afterwards (Ctrl-C stops it): commit to
# out/quickstart/config and watch the greeting change within the 30 s schedule.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/lib/examples.sh
source scripts/lib/examples.sh
keep=0
[[ "${1:-}" == "--keep-running" ]] && keep=1
say() { echo "quickstart: $*" >&2; }
[[ $EUID -eq 0 ]] || { say "run as root: debootstrap, chroot and mounts need it"; exit 1; }

say "1/6 installing what is missing"
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in git gcc curl ca-certificates python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { say "Rust is needed: https://rustup.rs (then run this again)"; exit 1; }
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
scripts/install-local-deps.sh

say "2/6 building stackless-init (static) and builder"
init=$(scripts/build-init.sh | tail -n1)
cargo build -q -p builder
builder="$repo/target/debug/builder"

say "3/6 baking preseeded (the first bake debootstraps Debian: a few minutes; later ones reuse it)"
t0=$(date +%s)
"$builder" bake preseeded --target local --init-binary "$init" -q >/dev/null
say "    baked in $(( $(date +%s) - t0 )) s: $(python3 -c 'import json; print(json.load(open("out/preseeded/manifest-local.json"))["artifact"])')"

say "4/6 serving examples/salt and examples/config from a git daemon"
qs="$repo/out/quickstart"
rm -rf "$qs"
example_repos "$qs"
git_port=$(free_port)
web_port=$(free_port)
git daemon --reuseaddr --export-all --base-path="$qs/git" --listen=127.0.0.1 --port="$git_port" "$qs/git" \
    >"$qs/git-daemon.log" 2>&1 &
daemon=$!
boot=""
trap 'kill -TERM $daemon ${boot} 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM

ud="$qs/user-data.toml"
example_user_data "$ud"

say "5/6 booting it in qemu (the console is in $qs/console.log)"
"$builder" boot out/preseeded --user-data "$ud" --keep-running --no-console \
    --port "$web_port:8080" --forward "169.254.0.100:9418=127.0.0.1:$git_port" \
    --console-log "$qs/console.log" >"$qs/boot.out" 2>"$qs/boot.err" &
boot=$!
until grep -a -q 'stackless-init-result: ' "$qs/console.log" 2>/dev/null; do
    kill -0 "$boot" 2>/dev/null || { say "builder boot ended early:"; cat "$qs/boot.err" >&2; exit 1; }
    sleep 2
done

say "6/6 what the agent reported on the console:"
grep -a -E 'stackless-init(\[[0-9]+\])?: stackless-init:' "$qs/console.log" | sed 's/^.*stackless-init: /  /' >&2
outcome=$(grep -a -m1 'stackless-init-result: ' "$qs/console.log" | sed 's/^.*stackless-init-result: //' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["outcome"])')
greeting=""
for _ in $(seq 1 30); do
    greeting=$(curl -s --max-time 5 "http://127.0.0.1:$web_port/" || true)
    [[ -n "$greeting" ]] && break
    sleep 2
done
say "the agent says: $outcome; the web program (127.0.0.1:$web_port) says: ${greeting:-nothing}"
if ((keep)); then
    say "the machine stays up. Try: edit $qs/config/web/greeting.txt, commit and push, then"
    say "  curl http://127.0.0.1:$web_port/   (within 30 s). Ctrl-C stops it."
    wait "$boot" || true
fi
[[ "$outcome" == ready && -n "$greeting" ]]
