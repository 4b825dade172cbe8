#!/usr/bin/env bash
# The boot race (issue 18): stackless-init against cloud-init doing the same work, booted in the
# same qemu with the same accelerator, one after the other, in one run. Each image is baked
# locally on the same debootstrapped Debian base:
#   preseeded   the agent, supervisord and salt (images/preseeded.toml);
#   cloud-init  the same image with the agent's unit off and Debian's cloud-init on, its Ec2
#               datasource reading the same IMDS emulator; its runcmd clones the same
#               repositories and runs the same highstate (scripts/bench/boot/);
#   bare        the agent and supervisord; salt is pip-installed at first boot (once: minutes).
# Measured: from `builder boot` starting qemu to the example web program answering its greeting
# from the config repository on a forwarded port (polled every 0.25 s), which needs the
# highstate finished (it writes and starts the program). Then re-bakes of preseeded (--force)
# with the builder's caches (BOOT_RACE_REBAKES of them, default 3) and one without (--no-cache).
#
#   scripts/bench/boot-race.sh WORK_DIR [RUNS]     prints the figures as JSON on stdout
#
# Environment: BUILDER (default target/debug/builder), STACKLESS_INIT_STATIC (the static agent,
# default target/x86_64-unknown-linux-musl/release/stackless-init), BOOT_RACE_ACCEL (auto),
# BOOT_RACE_BARE=0 to leave out the bare image. Needs root (debootstrap, chroot) and qemu, as
# tests/e2e-local.sh does. Run by scripts/bench.sh when BENCH_BOOT=1.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
# shellcheck source=scripts/lib/examples.sh
source scripts/lib/examples.sh
W="${1:?usage: boot-race.sh WORK_DIR [RUNS]}"
RUNS="${2:-3}"
builder="${BUILDER:-$repo/target/debug/builder}"
init="${STACKLESS_INIT_STATIC:-$repo/target/x86_64-unknown-linux-musl/release/stackless-init}"
accel="${BOOT_RACE_ACCEL:-auto}"
with_bare="${BOOT_RACE_BARE:-1}"
pids=()

say() { echo "boot-race: $*" >&2; }
die() { say "error: $*"; exit 1; }
git_pgid=""
cleanup() {
    # git daemon runs a git-daemon child per connection: its whole process group goes.
    [[ -n "$git_pgid" ]] && kill -TERM -- "-$git_pgid" 2>/dev/null || true
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ -x "$builder" ]] || die "no builder at $builder (cargo build -p builder)"
[[ -x "$init" ]] || die "no static stackless-init at $init (scripts/build-init.sh)"
mkdir -p "$W"
# qemu runs `builder relay` per guest connection: a private copy, so a rebuild cannot swap it.
cp "$builder" "$W/builder"
builder="$W/builder"

# The definitions: the shipped ones and the bench's cloud-init image, which extends preseeded.
rm -rf "$W/images"
mkdir -p "$W/images"
cp images/*.toml scripts/bench/boot/cloud-init.toml "$W/images/"
images=(preseeded cloud-init)
[[ "$with_bare" == 1 ]] && images+=(bare)
declare -A bake_ms
for image in "${images[@]}"; do
    say "baking $image (local; reused when nothing that shapes it changed)"
    t0=$(date +%s%N)
    "$builder" -q --images-dir "$W/images" bake "$image" --target local --init-binary "$init" \
        >"$W/bake-$image.out" 2>"$W/bake-$image.err" ||
        die "baking $image: $(tail -n 20 "$W/bake-$image.err")"
    bake_ms[$image]=$(( ($(date +%s%N) - t0) / 1000000 ))
done

# The same repositories for both, from a git daemon on loopback.
rm -rf "$W/repos"
example_repos "$W/repos"
git_port=$(free_port)
setsid git daemon --reuseaddr --export-all --base-path="$W/repos/git" --listen=127.0.0.1 \
    --port="$git_port" "$W/repos/git" >"$W/git-daemon.log" 2>&1 &
git_pgid=$!
greeting=$(cat examples/config/web/greeting.txt)

# The agent's user-data is the quickstart's. Only bare needs this machine's extra CAs (it
# pip-installs salt; HTTPS here may go through an intercepting proxy).
cp examples/user-data.toml "$W/ud-preseeded.toml"
example_user_data "$W/ud-bare.toml"
cp scripts/bench/boot/cloud-config.yaml "$W/ud-cloud-init.yaml"
user_data() { case "$1" in preseeded) echo "$W/ud-preseeded.toml" ;; bare) echo "$W/ud-bare.toml" ;; cloud-init) echo "$W/ud-cloud-init.yaml" ;; esac; }

# One boot: from starting `builder boot` (which starts qemu at once, over a fresh overlay) to the
# greeting on the forwarded port. Sets $ms; the console is kept as NAME.console. Then waits (up
# to a minute, not counted) for the line that says the boot is done, the agent's result line or
# cloud-init's "finished", and sets $done_ms to when it appeared (on the same clock).
race_one() { # image name timeout-seconds
    local image=$1 name=$2 limit=$3 port t0 got="" pid done_re
    port=$(free_port)
    t0=$(date +%s%N)
    "$builder" --output json boot "out/$image" --user-data "$(user_data "$image")" --keep-running \
        --accel "$accel" --port "$port:8080" --forward "169.254.0.100:9418=127.0.0.1:$git_port" \
        --console-log "$W/$name.console" --no-console --timeout 60m >"$W/$name.json" 2>"$W/$name.err" &
    pid=$!
    pids+=("$pid")
    while :; do
        got=$(curl -s --max-time 2 "http://127.0.0.1:$port/" || true)
        [[ "$got" == "$greeting" ]] && break
        kill -0 "$pid" 2>/dev/null || die "$name: builder boot ended before the web program answered: $(tail -n 5 "$W/$name.err")"
        if (( ($(date +%s%N) - t0) / 1000000000 > limit )); then
            tail -n 40 "$W/$name.console" >&2 || true
            die "$name: the web program did not answer '$greeting' within $limit s (last answer: '$got')"
        fi
        sleep 0.25
    done
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    done_re='stackless-init-result: |Cloud-init v\. [^ ]+ finished at'
    done_ms=""
    for _ in $(seq 240); do
        if grep -a -q -E "$done_re" "$W/$name.console" 2>/dev/null; then
            done_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
            break
        fi
        sleep 0.25
    done
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
}

# A boot that is not counted: `--accel auto` probes KVM once per host (15 s and more) and caches
# the verdict, and the first qemu start reads its binary and firmware from disk.
say "warm-up boot (not counted; settles the accelerator)"
race_one preseeded warmup 1200

declare -A times dones
for ((r = 1; r <= RUNS; r++)); do
    # Alternating the order, so neither image always boots on a machine just warmed by the other.
    if (( r % 2 )); then order=(preseeded cloud-init); else order=(cloud-init preseeded); fi
    for image in "${order[@]}"; do
        race_one "$image" "$image-$r" 1200
        say "$image, run $r: web answered after $ms ms (said done after ${done_ms:-?} ms)"
        times[$image]="${times[$image]:-} $ms"
        dones[$image]="${dones[$image]:-} ${done_ms:-0}"
    done
done
if [[ "$with_bare" == 1 ]]; then
    race_one bare bare-1 3600
    say "bare: web answered after $ms ms (said done after ${done_ms:-?} ms)"
    times[bare]=" $ms"
    dones[bare]=" ${done_ms:-0}"
fi

# Iterating on an image (issue 18, item 3): re-bakes of preseeded as after a template change
# (--force), with the builder's caches (the Debian base, the packages layer, the pip wheelhouse,
# apt's packages) and, once, with --no-cache (the base alone: apt installs the packages and pip
# builds salt's dependencies), as on a fresh machine. After the race: they replace its disks.
REBAKES="${BOOT_RACE_REBAKES:-3}"
rebake_ms="" nocache_ms=0
for i in $(seq "$REBAKES"); do
    say "re-baking preseeded (--force, caches on) $i/$REBAKES"
    t0=$(date +%s%N)
    "$builder" --images-dir "$W/images" bake preseeded --target local --force --init-binary "$init" \
        >"$W/rebake-$i.out" 2>"$W/rebake-$i.err" || die "re-baking preseeded: $(tail -n 20 "$W/rebake-$i.err")"
    rebake_ms+=" $(( ($(date +%s%N) - t0) / 1000000 ))"
done
if [[ "$REBAKES" -gt 0 ]]; then
    say "re-baking preseeded (--force --no-cache)"
    t0=$(date +%s%N)
    "$builder" --images-dir "$W/images" bake preseeded --target local --force --no-cache --init-binary "$init" \
        >"$W/rebake-nocache.out" 2>"$W/rebake-nocache.err" ||
        die "re-baking preseeded without caches: $(tail -n 20 "$W/rebake-nocache.err")"
    nocache_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
fi

# The figures, and the accelerator every boot used (from the builder's log: `accel="tcg"`).
python3 - "$W" "$RUNS" "${bake_ms[preseeded]}" "${bake_ms[cloud-init]}" "${bake_ms[bare]:-0}" \
    "${times[preseeded]}" "${times[cloud-init]}" "${times[bare]:-}" \
    "${dones[preseeded]}" "${dones[cloud-init]}" "${dones[bare]:-}" "$rebake_ms" "$nocache_ms" <<'EOF'
import glob, json, os, re, sys
w, runs = sys.argv[1], int(sys.argv[2])
names = ["preseeded", "cloud-init", "bare"]
ints = lambda s: [int(x) for x in s.split()]
bake = dict(zip(names, map(int, sys.argv[3:6])))
web = dict(zip(names, map(ints, sys.argv[6:9])))
done = dict(zip(names, map(ints, sys.argv[9:12])))
accels = set()
# The counted boots only (NAME-RUN.err): the warm-up's KVM probe is not one of them.
for f in glob.glob(os.path.join(w, "*-[0-9]*.err")):
    accels.update(re.findall(r'INFO booting .*? accel="(\w+)"', open(f, errors="replace").read()))
json.dump({"runs": runs, "accel": sorted(accels), "bake_ms": bake, "web_ms": web,
           "said_done_ms": done, "rebake_ms": ints(sys.argv[12]),
           "rebake_nocache_ms": int(sys.argv[13])}, sys.stdout)
print()
EOF
