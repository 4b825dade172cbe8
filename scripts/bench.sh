#!/usr/bin/env bash
# Benchmarks: the agent against the tools it replaces, side by side, in one run (issue 7).
# Writes docs/benchmarks.md: one markdown table, the machine, notes on method and on any figure
# far from its goal. Not part of the test suite. A few minutes on a 2-core machine.
#
#   scripts/bench.sh                 full run, regenerates docs/benchmarks.md
#   BENCH_QUICK=1 scripts/bench.sh   few iterations, writes $BENCH_DIR/benchmarks.md instead
#   BENCH_BOOT=1 scripts/bench.sh    adds the boot race against cloud-init in qemu
#                                    (scripts/bench/boot-race.sh; root, tens of minutes;
#                                    BENCH_BOOT_RUNS pairs of boots, default 5: runs vary by
#                                    tens of percent on a shared machine)
#
# Environment: BENCH_DIR (work folder, default /tmp/stackless-bench, emptied at start and removed
# at exit unless BENCH_KEEP=1), BENCH_NO_BUILD=1 (use the binaries already built), BENCH_OUT.
# Uses: the shipped static binary (scripts/build-init.sh), the IMDS emulator, real salt-call and
# supervisord (.venv, scripts/install-test-deps.sh), inotify-tools, git, and ansible-core from
# PyPI in a throwaway virtualenv under /tmp (kept between runs).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
here="$repo/scripts/bench"
W="${BENCH_DIR:-/tmp/stackless-bench}"
AVENV="${BENCH_ANSIBLE_VENV:-/tmp/stackless-bench-ansible}"
ANSIBLE_PIN="ansible-core==2.18.19"
QUICK="${BENCH_QUICK:-0}"
if [[ $QUICK == 1 ]]; then
    OUT="${BENCH_OUT:-$W/benchmarks.md}"
    N_BOOT=2 N_LAT=8 N_NOOP=4 N_ANS=2 N_COMMIT=2 IDLE_S=5 BURST_WINDOW=4 N_FLEET=1 N_REVERT=2 N_INC=2
else
    OUT="${BENCH_OUT:-$repo/docs/benchmarks.md}"
    N_BOOT=9 N_LAT=60 N_NOOP=21 N_ANS=7 N_COMMIT=5 IDLE_S=60 BURST_WINDOW=10 N_FLEET=3 N_REVERT=5 N_INC=9
fi
VENV="$repo/.venv/bin"
PY="$VENV/python"
started=$(date +%s)

log() { printf '[bench %3ds] %s\n' $(($(date +%s) - started)) "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- clean start, and clean exit ------------------------------------------------------------------
pids=()
cleanup() {
    local p
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        p=${pids[i]}
        # Each daemon runs in a process group of its own (setsid): end the whole group.
        kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$p" 2>/dev/null || true
    done
    if [[ ${BENCH_KEEP:-0} != 1 ]]; then rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a daemon in its own session (so cleanup ends its children too); sets $last_pid.
daemon() {
    local logf=$1
    shift
    setsid "$@" >"$logf" 2>&1 </dev/null &
    last_pid=$!
    pids+=("$last_pid")
}
stop() {
    local p=$1
    kill -TERM -- "-$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL -- "-$p" 2>/dev/null || true
}
wait_for() { # SECS DESCRIPTION COMMAND...
    local secs=$1 what=$2
    shift 2
    local end=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) < end)) || die "timed out after ${secs}s waiting for $what"
        sleep 0.05
    done
}

rm -rf "$W"
mkdir -p "$W"/{log,res,git,watch,pids,bin,roots}
R="$W/res"

# --- dependencies and binaries --------------------------------------------------------------------
log "dependencies"
"$repo/scripts/install-test-deps.sh" >&2
command -v inotifywait >/dev/null || die "inotifywait missing (apt-get install inotify-tools)"
have=$("$AVENV/bin/python" -c 'import importlib.metadata as m; print(m.version("ansible-core"))' 2>/dev/null || true)
if [[ ! -x $AVENV/bin/ansible-pull || $have != "${ANSIBLE_PIN#*==}" ]]; then
    log "installing $ANSIBLE_PIN into $AVENV (throwaway virtualenv)"
    /usr/bin/python3 -m venv "$AVENV"
    "$AVENV/bin/pip" install -q "$ANSIBLE_PIN" >&2
fi
if [[ ${BENCH_NO_BUILD:-0} == 1 ]]; then
    BIN="$repo/target/x86_64-unknown-linux-musl/release/stackless-init"
    BIN_ARM="$repo/target/aarch64-unknown-linux-musl/release/stackless-init"
else
    log "building the static binaries (x86_64, aarch64) and the IMDS emulator"
    built=$("$repo/scripts/build-init.sh" --arch all)
    BIN=$(tail -1 <<<"$built")
    BIN_ARM=$(head -1 <<<"$built")
    (cd "$repo" && cargo build --quiet --locked -p init --features emulator --bin imds-emulator >&2)
    (cd "$repo" && cargo build --quiet --locked -p builder --bin builder >&2)
fi
EMU="${CARGO_TARGET_DIR:-$repo/target}/debug/imds-emulator"
BUILDER="${CARGO_TARGET_DIR:-$repo/target}/debug/builder"
[[ -x $BIN && -x $EMU && -x $BUILDER ]] || die "missing $BIN, $EMU or $BUILDER"
prepared=$(($(date +%s) - started))
export PATH="$VENV:$PATH"
export ANSIBLE_HOME="$W/ansible-home" ANSIBLE_LOCAL_TEMP="$W/ansible-home/tmp"
unset STACKLESS_ROOT RUST_LOG NOTIFY_SOCKET

# Whether someone else keeps the machine busy (a compiler, say): sampled between phases.
busy() {
    local r c
    r=$(pgrep -c -x rustc || true) c=$(pgrep -c -x cargo || true)
    echo "$1 load=$(cut -d' ' -f1-3 /proc/loadavg) rustc=${r:-0} cargo=${c:-0}" >>"$R/busy.log"
}
busy start

# --- a salt repository: trivial state tree, and a playbook for ansible-pull ------------------------
g() { git -C "$1" -c user.name=bench -c user.email=bench@example.com "${@:2}"; }
git init -q --bare -b main "$W/git/salt.git"
git init -q -b main "$W/git/salt-work"
g "$W/git/salt-work" remote add origin "$W/git/salt.git"
printf "base:\n  '*':\n    - nop\n" >"$W/git/salt-work/top.sls"
printf "nothing:\n  test.nop: []\n" >"$W/git/salt-work/nop.sls"
cat >"$W/git/salt-work/local.yml" <<'EOF'
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: nothing
      ansible.builtin.debug:
        msg: nothing to do
EOF
commit() {
    echo "$1" >"$W/git/salt-work/revision"
    g "$W/git/salt-work" add -A
    g "$W/git/salt-work" commit -q -m "$1"
    g "$W/git/salt-work" push -q origin main
}
commit "first"
SALT_URL="file://$W/git/salt.git"

# --- supervisord with one program per contender -------------------------------------------------------
SUP="$W/sup"
mkdir -p "$SUP/conf.d"
cat >"$SUP/supervisord.conf" <<EOF
[unix_http_server]
file=$SUP/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
nodaemon=true
logfile=$SUP/supervisord.log
pidfile=$SUP/supervisord.pid
childlogdir=$SUP

[supervisorctl]
serverurl=unix://$SUP/supervisor.sock

[include]
files = $SUP/conf.d/*.conf
EOF
contenders=(agent quiet naive hand)
for c in "${contenders[@]}"; do
    mkdir -p "$W/watch/$c"
    for f in app a b; do echo initial >"$W/watch/$c/$f.conf"; done
    # The program writes its pid as it starts, so the latency probe sees a restart without
    # polling supervisord; startsecs=0 as in the issue.
    cat >"$SUP/conf.d/app-$c.conf" <<EOF
[program:app-$c]
command=/bin/sh -c 'echo \$\$ > $W/pids/app-$c; exec sleep 1000000'
startsecs=0
autorestart=false
stopwaitsecs=5
stopasgroup=true
killasgroup=true
EOF
done
SOCK="$SUP/supervisor.sock"
daemon "$W/log/supervisord.log" "$VENV/supervisord" -c "$SUP/supervisord.conf"
running() { "$VENV/supervisorctl" -s "unix://$SOCK" status "app-$1" 2>/dev/null | grep -q RUNNING; }
for c in "${contenders[@]}"; do wait_for 30 "app-$c to run" running "$c"; done
spawns() { grep -c "spawned: 'app-$1'" "$SUP/supervisord.log" || true; }
kills() { grep -c "killing 'app-$1'" "$SUP/supervisord.log" || true; }

# --- IMDS emulators, one per user-data ---------------------------------------------------------------
emulator() { # NAME USERDATA-FILE -> $endpoint
    daemon "$W/log/emu-$1.out" "$EMU" --listen 127.0.0.1:0 --user-data "$2"
    wait_for 20 "the IMDS emulator" grep -q '^AWS_EC2_METADATA_SERVICE_ENDPOINT=' "$W/log/emu-$1.out"
    endpoint=$(sed -n 's/^AWS_EC2_METADATA_SERVICE_ENDPOINT=//p' "$W/log/emu-$1.out")
}
agent_ud() { # NAME EXTRA: the resident user-data of contender NAME
    cat <<EOF
minion_id = "bench-$1"
[salt]
repo = "$SALT_URL"
[sync]
schedule = "@every 15m"
[supervisor]
socket = "$SOCK"
conf_dir = "$SUP/conf.d"
$2
[[watch]]
paths = ["$W/watch/$1/*.conf"]
restart = ["app-$1"]
EOF
}

# --- 1. binary size ------------------------------------------------------------------------------------
log "binary size"
ans_bytes=$(du -sb "$AVENV/lib" | cut -f1)
arm_bytes=null
[[ -f $BIN_ARM ]] && arm_bytes=$(stat -c %s "$BIN_ARM")
printf '{"bytes": %s, "aarch64_bytes": %s, "alt_bytes": %s}\n' "$(stat -c %s "$BIN")" "$arm_bytes" "$ans_bytes" >"$R/size.json"

# --- 2. boot overhead ---------------------------------------------------------------------------------
log "boot overhead: $N_BOOT boots after 2 warm-ups"
printf 'minion_id = "bench-boot"\n[salt]\nrepo = "%s"\n[sync]\nschedule = "@every 15m"\n' "$SALT_URL" >"$W/ud-boot.toml"
emulator boot "$W/ud-boot.toml"
EP_BOOT=$endpoint
# The hand-written equivalent: what a user-data shell script does before it runs salt.
cat >"$W/bin/bootstrap.sh" <<'EOF'
#!/bin/bash
# IMDSv2 token, user-data, identity; the minion id; the salt checkout updated with git.
set -euo pipefail
e=$AWS_EC2_METADATA_SERVICE_ENDPOINT d=$1
t=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "$e/latest/api/token")
curl -sf -H "X-aws-ec2-metadata-token: $t" -o "$d/user-data" "$e/latest/user-data"
curl -sf -H "X-aws-ec2-metadata-token: $t" -o "$d/identity.json" "$e/latest/dynamic/instance-identity/document"
id=$(sed -n 's/.*"instanceId" *: *"\([^"]*\)".*/\1/p' "$d/identity.json")
echo "bench-$id" >"$d/minion_id"
git -C "$d/salt" fetch -q --depth 1 origin main
git -C "$d/salt" reset -q --hard FETCH_HEAD
EOF
chmod +x "$W/bin/bootstrap.sh"
mkdir -p "$W/roots/shell"
git clone -q --depth 1 "$SALT_URL" "$W/roots/shell/salt"
AWS_EC2_METADATA_SERVICE_ENDPOINT=$EP_BOOT "$PY" "$here/bench.py" boot --bin "$BIN" --root "$W/roots/boot" \
    --runs "$N_BOOT" --warmup 2 --shell "$W/bin/bootstrap.sh" --shell-dir "$W/roots/shell" >"$R/boot.json"
busy boot

# --- 3. no-op sync: the agent against ansible-pull on the same repository ----------------------------
log "no-op sync: agent x$N_NOOP, git ls-remote x$N_NOOP, ansible-pull x$N_ANS (after warm-ups)"
# ansible-pull finds ansible and ansible-playbook beside itself; a folder of links lets the
# new-commit run below wrap ansible-playbook with a time stamp.
mkdir -p "$W/abin"
for t in ansible ansible-pull ansible-playbook; do ln -s "$AVENV/bin/$t" "$W/abin/$t"; done
pull=("$W/abin/ansible-pull" --only-if-changed -U "$SALT_URL" -d "$W/roots/ansible" local.yml)
"${pull[@]}" >"$W/log/ansible-first.log" 2>&1 || die "ansible-pull failed: $(tail -5 "$W/log/ansible-first.log")"
{
    printf '{"agent": '
    "$PY" "$here/bench.py" cpu --runs "$N_NOOP" --warmup 3 -- "$BIN" --root "$W/roots/boot" sync
    printf ', "lsremote": '
    "$PY" "$here/bench.py" cpu --runs "$N_NOOP" --warmup 3 -- git ls-remote "$SALT_URL" refs/heads/main
    printf ', "ansible": '
    "$PY" "$here/bench.py" cpu --runs "$N_ANS" --warmup 2 -- "${pull[@]}"
    printf '}\n'
} >"$R/sync_noop.json"
busy noop-sync

# --- 4. a sync with a new commit: time to highstate (salt-call) / playbook (ansible-playbook) -------
log "new commit: $N_COMMIT syncs each"
for t in salt-call ansible-playbook; do
    real="$VENV/salt-call"
    [[ $t == ansible-playbook ]] && real="$AVENV/bin/ansible-playbook"
    rm -f "$W/abin/$t"
    printf '#!/bin/bash\necho "$EPOCHREALTIME" >>%s\nexec %s "$@"\n' "$W/stamp-$t" "$real" >"$W/bin/$t-stamped"
    chmod +x "$W/bin/$t-stamped"
done
ln -s "$W/bin/ansible-playbook-stamped" "$W/abin/ansible-playbook"
printf 'minion_id = "bench-commit"\n[salt]\nrepo = "%s"\nsalt_call = "%s"\n[sync]\nschedule = "@every 15m"\n' \
    "$SALT_URL" "$W/bin/salt-call-stamped" >"$W/ud-commit.toml"
emulator commit "$W/ud-commit.toml"
AWS_EC2_METADATA_SERVICE_ENDPOINT=$endpoint "$BIN" --root "$W/roots/commit" boot --once 2>"$W/log/boot-commit.log" ||
    die "boot for the new-commit runs failed: $(tail -3 "$W/log/boot-commit.log")"
{
    printf '{"agent": ['
    for i in $(seq "$N_COMMIT"); do
        commit "revision $i"
        ((i > 1)) && printf ', '
        "$PY" "$here/bench.py" spawnstamp --stamp "$W/stamp-salt-call" --timeline-root "$W/roots/commit" --bin "$BIN" -- \
            "$BIN" --root "$W/roots/commit" sync
        a=$("$PY" "$here/bench.py" spawnstamp --stamp "$W/stamp-ansible-playbook" -- "${pull[@]}")
        echo "$a" >>"$W/ansible-commit.jsonl"
    done
    printf '], "ansible": [%s]}\n' "$(paste -sd, "$W/ansible-commit.jsonl")"
} >"$R/sync_commit.json"
busy new-commit

# --- 5. resident: the agent (twice), the naive loop and the hand-written loop --------------------------
log "resident contenders"
agent_ud agent "" >"$W/ud-agent.toml"
agent_ud quiet $'[watcher]\nquiet = "10ms"' >"$W/ud-quiet.toml"
for c in agent quiet; do
    emulator "$c" "$W/ud-$c.toml"
    daemon "$W/log/agent-$c.log" env AWS_EC2_METADATA_SERVICE_ENDPOINT="$endpoint" "$BIN" --root "$W/roots/$c" boot
    declare "PID_$c=$last_pid"
    "$BIN" --root "$W/roots/$c" wait --timeout 120 >/dev/null || die "resident agent $c not ready: $(tail -5 "$W/log/agent-$c.log")"
done
start_naive() {
    daemon "$W/log/naive.log" "$here/naive-loop.sh" "$W/watch/naive" "$SOCK" app-naive "$VENV/supervisorctl"
    PID_naive=$last_pid
    wait_for 20 "inotifywait" grep -q "Watches established" "$W/log/naive.log"
}
start_hand() {
    daemon "$W/log/hand.log" /usr/bin/python3 "$here/handloop.py" "$W/watch/hand" "$SOCK" app-hand
    PID_hand=$last_pid
    wait_for 20 "the hand-written loop" grep -q "^ready" "$W/log/hand.log"
}
start_naive
start_hand
busy resident-up

log "idle: RSS and wake-ups over ${IDLE_S}s, all contenders at once"
sleep 2
"$PY" "$here/bench.py" idle --secs "$IDLE_S" --agent "$PID_agent" --workdir "$W" \
    --agent-dirs "$W/watch/agent" "$SUP/conf.d" "$W/roots/agent/etc/stackless/watch.d" \
    -- agent="$PID_agent" naive="$PID_naive" hand="$PID_hand" >"$R/idle.json"
busy idle

log "change-to-restart latency: $N_LAT changes per contender after 5 warm-ups, contenders in turns"
lat_args=()
for c in "${contenders[@]}"; do
    lat_args+=(--contender "$c=app-$c,$W/watch/$c/app.conf,$W/pids/app-$c")
done
"$PY" "$here/bench.py" latency --socket "$SOCK" "${lat_args[@]}" --count "$N_LAT" --warmup 5 >"$W/lat.json"
busy latency
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); d["quiet"]["quiet"]="10ms"; d["agent_quiet"]=d.pop("quiet"); print(json.dumps(d))' \
    "$W/lat.json" >"$R/latency.json"

log "burst of 1000 writes per contender"
# An observer (inotifywait -m into a file, the same events and mask the loops use) counts the
# events each burst delivers: the loops restart once per event, the agent coalesces them.
observe() { # NAME
    daemon "$W/log/observer-$1.err" sh -c "exec inotifywait -m -e close_write,moved_to '$W/watch/$1' >'$W/events-$1' 2>'$W/log/observer-$1.log'"
    obs_pid=$last_pid
    wait_for 20 "the event observer" grep -q "Watches established" "$W/log/observer-$1.log"
}
cpu_ms() { # PID: user + system time so far, from /proc/PID/stat
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) * 1000 / hz }' "/proc/$1/stat"
}
burst() { # NAME WINDOW: the burst, then restarts and events; WINDOW 0 waits until 3 s pass without one
    local name=$1 window=$2 before kills0 w n last=-1 stable=0 end cpu0=0 cpu=0
    observe "$name"
    before=$(spawns "$name") kills0=$(kills "$name")
    [[ $name == agent ]] && cpu0=$(cpu_ms "$PID_agent")
    w=$("$PY" "$here/bench.py" burst --dir "$W/watch/$name" --tag "$name")
    if ((window > 0)); then
        sleep "$window"
    else
        end=$(($(date +%s) + 20))
        while (($(date +%s) < end)); do
            n=$(spawns "$name")
            if [[ $n == "$last" ]]; then stable=$((stable + 1)); else stable=0 last=$n; fi
            ((stable >= 30 && n > before)) && break
            sleep 0.1
        done
    fi
    stop "$obs_pid"
    [[ $name == agent ]] && cpu=$(cpu_ms "$PID_agent")
    "$PY" -c 'import json,sys; w=json.loads(sys.argv[1]); print(json.dumps({"writes": w["writes"], "write_ms": round(w["ms"]), "restarts": int(sys.argv[2]), "events": int(sys.argv[3]), "window_s": float(sys.argv[4]), "kills": int(sys.argv[5]), "agent_cpu_ms": float(sys.argv[6]) - float(sys.argv[7])}))' \
        "$w" $(($(spawns "$name") - before)) "$(wc -l <"$W/events-$name")" "$window" $(($(kills "$name") - kills0)) "$cpu" "$cpu0"
}
b_agent=$(burst agent 0)
# The loops would go on restarting once per queued event for minutes: they get a fixed window.
b_naive=$(burst naive "$BURST_WINDOW")
stop "$PID_naive"
b_hand=$(burst hand "$BURST_WINDOW")
stop "$PID_hand"
printf '{"agent": %s, "naive": %s, "hand": %s}\n' "$b_agent" "$b_naive" "$b_hand" >"$R/burst.json"
cp "$W/roots/agent/var/lib/stackless/state.json" "$R/agent-state.json" 2>/dev/null || true
busy burst

log "a highstate that rewrites a watched file three times, 0.3 s apart"
# The same states for both: written by salt (a temporary file renamed over), appended to, edited in
# place. The agent applies them in a sync (`stackless-init sync`, a salt commit); the hand-written
# loop's file gets them from salt-call --local run beside it, as a team would run salt.
rewrite_sls() { # FILE
    cat <<EOF
written:
  file.managed:
    - name: $1
    - contents: text=one
pause-1:
  cmd.run:
    - name: sleep 0.3
    - require: [{file: written}]
appended:
  file.append:
    - name: $1
    - text: more=two
    - require: [{cmd: pause-1}]
pause-2:
  cmd.run:
    - name: sleep 0.3
    - require: [{file: appended}]
replaced:
  file.replace:
    - name: $1
    - pattern: two
    - repl: three
    - require: [{cmd: pause-2}]
EOF
}
restarts_during() { # NAME COMMAND...: restarts of app-NAME from the command's start until 3 s pass without one
    local name=$1 before n last=-1 stable=0 end
    shift
    before=$(spawns "$name")
    "$@" >>"$W/log/highstate-$name.log" 2>&1 || die "highstate row, $name: $(tail -5 "$W/log/highstate-$name.log")"
    end=$(($(date +%s) + 20))
    while (($(date +%s) < end)); do
        n=$(spawns "$name")
        if [[ $n == "$last" ]]; then stable=$((stable + 1)); else stable=0 last=$n; fi
        ((stable >= 30)) && break
        sleep 0.1
    done
    echo $((n - before))
}
mkdir -p "$W/salt-hand/states" "$W/salt-hand/etc" "$W/salt-hand/root"
rewrite_sls "$W/watch/hand/app.conf" >"$W/salt-hand/states/rewrite.sls"
printf 'file_client: local\nroot_dir: %s\nfile_roots:\n  base: [%s]\nid: bench-hand\n' \
    "$W/salt-hand/root" "$W/salt-hand/states" >"$W/salt-hand/etc/minion"
printf "base:\n  '*':\n    - rewrite\n" >"$W/git/salt-work/top.sls"
rewrite_sls "$W/watch/agent/app.conf" >"$W/git/salt-work/rewrite.sls"
commit "three writes to a watched file"
ep_agent=$(sed -n 's/^AWS_EC2_METADATA_SERVICE_ENDPOINT=//p' "$W/log/emu-agent.out")
hs_agent=$(restarts_during agent env AWS_EC2_METADATA_SERVICE_ENDPOINT="$ep_agent" "$BIN" --root "$W/roots/agent" sync)
start_hand
hs_hand=$(restarts_during hand timeout 300 "$VENV/salt-call" --config-dir "$W/salt-hand/etc" --local state.apply rewrite)
stop "$PID_hand"
printf '{"agent": %s, "hand": %s, "writes": 3}\n' "$hs_agent" "$hs_hand" >"$R/highstate_burst.json"
printf "base:\n  '*':\n    - nop\n" >"$W/git/salt-work/top.sls"
commit "back to nop"
busy highstate-burst

# --- 6. fleet: `builder fleet` listing 1,000 instances with report tags, against moto ---------------
log "fleet: builder fleet over 1,000 moto instances, x3, beside boto3"
moto_port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
daemon "$W/moto.log" "$VENV/moto_server" -H 127.0.0.1 -p "$moto_port"
PID_moto=$last_pid
wait_for 30 "moto_server" "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $moto_port))"
"$PY" "$here/bench.py" fleet --endpoint "http://127.0.0.1:$moto_port" --builder "$BUILDER" --count 1000 \
    --runs "$N_FLEET" >"$R/fleet.json"
stop "$PID_moto"
busy end

# --- 7. a bad config commit: from its release published to the program running on the good one ----
log "bad config commit, reverted: $N_REVERT times"
git init -q --bare -b main "$W/git/config.git"
git init -q -b main "$W/git/config-work"
g "$W/git/config-work" remote add origin "$W/git/config.git"
ccommit() { # CONTENT MESSAGE: prints the new commit
    echo "$1" >"$W/git/config-work/app.conf"
    g "$W/git/config-work" add -A
    g "$W/git/config-work" commit -q -m "$2"
    g "$W/git/config-work" push -q origin main
    g "$W/git/config-work" rev-parse HEAD
}
good=$(ccommit "good 0" "good 0")
CUR="$W/roots/revert/var/lib/stackless/repos/config/current"
# supervisord's default startsecs, fewer retries: a bad start is FATAL after one retry.
STARTSECS=1 STARTRETRIES=1
cat >"$SUP/conf.d/app-revert.conf" <<EOF
[program:app-revert]
command=/bin/sh -c 'grep -q good $CUR/app.conf || { echo refusing this configuration >&2; exit 1; }; echo \$\$ > $W/pids/app-revert; exec sleep 1000000'
autostart=false
startsecs=$STARTSECS
startretries=$STARTRETRIES
autorestart=false
stopwaitsecs=5
stopasgroup=true
killasgroup=true
EOF
"$VENV/supervisorctl" -s "unix://$SOCK" update >/dev/null
cat >"$W/ud-revert.toml" <<EOF
minion_id = "bench-revert"
[config]
repo = "file://$W/git/config.git"
[sync]
schedule = "@every 1s"
[supervisor]
socket = "$SOCK"
conf_dir = "$SUP/conf.d"
[[watch]]
paths = ["$CUR/app.conf"]
restart = ["app-revert"]
EOF
emulator revert "$W/ud-revert.toml"
daemon "$W/log/agent-revert.log" env AWS_EC2_METADATA_SERVICE_ENDPOINT="$endpoint" "$BIN" --root "$W/roots/revert" boot
"$BIN" --root "$W/roots/revert" wait --timeout 120 >/dev/null || die "the revert agent is not ready: $(tail -5 "$W/log/agent-revert.log")"
"$VENV/supervisorctl" -s "unix://$SOCK" start app-revert >/dev/null
judged_good() { # SHA: the agent recorded SHA as the last good config release
    "$BIN" --root "$W/roots/revert" status --json |
        "$PY" -c 'import json,sys; sys.exit(json.load(sys.stdin).get("releases",{}).get("config",{}).get("good") != sys.argv[1])' "$1"
}
wait_for 60 "the first config release judged good" judged_good "$good"
: >"$W/revert.jsonl"
for i in $(seq "$N_REVERT"); do
    bad=$(ccommit "broken $i" "bad $i")
    "$PY" "$here/bench.py" revert --socket "$SOCK" --program app-revert --pidfile "$W/pids/app-revert" \
        --current "$CUR" --bad "$bad" --good "$good" >>"$W/revert.jsonl" ||
        die "revert $i: $(tail -5 "$W/log/agent-revert.log")"
    echo >>"$W/revert.jsonl"
    good=$(ccommit "good $i" "good $i")
    wait_for 60 "config release good $i judged good" judged_good "$good"
done
"$PY" -c 'import json,sys; ms=[json.loads(l)["ms"] for l in open(sys.argv[1]) if l.strip()]; print(json.dumps({"ms": ms, "startsecs": int(sys.argv[2]), "startretries": int(sys.argv[3])}))' \
    "$W/revert.jsonl" "$STARTSECS" "$STARTRETRIES" >"$R/revert.json"
busy revert

# --- 8. incremental sync: a one-line commit on a 32 MB repository (issue 17) -------------------------
log "incremental sync: $N_INC one-line commits on a generated 32 MB repository, agent and a persistent clone"
"$here/incremental.sh" "$BIN" "$EMU" "$W/incremental" "$N_INC" >"$R/incremental.json" 2>"$W/log/incremental.log" ||
    die "incremental sync bench failed: $(tail -5 "$W/log/incremental.log")"
busy incremental

# --- 9. the boot race (opt-in: BENCH_BOOT=1, tens of minutes under TCG) -----------------------------
if [[ ${BENCH_BOOT:-0} == 1 ]]; then
    log "boot race: preseeded against cloud-init doing the same work, then bare, in qemu"
    BUILDER="$BUILDER" STACKLESS_INIT_STATIC="$BIN" "$here/boot-race.sh" "$W/boot-race" \
        "$([[ $QUICK == 1 ]] && echo 1 || echo "${BENCH_BOOT_RUNS:-5}")" >"$R/boot-race.json" 2>"$W/log/boot-race.log" ||
        die "boot race failed: $(tail -5 "$W/log/boot-race.log")"
    busy boot-race
fi

# --- the page ----------------------------------------------------------------------------------------
tools="stackless-init $("$BIN" --version 2>/dev/null | awk '{print $NF}'), $(salt-call --version 2>/dev/null), supervisor $("$VENV/supervisord" --version), $("$AVENV/bin/ansible-pull" --version 2>/dev/null | sed -n '1{s/[][]//g;p}'), $(git --version), inotifywait $(inotifywait --help 2>&1 | awk 'NR == 1 {print $2}'), $(/usr/bin/python3 --version)"
"$PY" - "$R/machine.json" "$tools" "$(($(date +%s) - started))" "$QUICK" "$prepared" <<'EOF'
import json, os, platform, subprocess, sys, time
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next(l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal"))
osr = dict(l.rstrip("\n").split("=", 1) for l in open("/etc/os-release") if "=" in l)
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "cpu": cpu, "nproc": os.cpu_count(), "kernel": platform.release(),
    "os": osr.get("PRETTY_NAME", "?").strip('"'), "mem": mem,
    "tools": sys.argv[2], "elapsed_s": int(sys.argv[3]), "quick": sys.argv[4] == "1",
    "prepare_s": int(sys.argv[5]),
    "busy": open(os.path.join(os.path.dirname(sys.argv[1]), "busy.log")).read().splitlines(),
}, open(sys.argv[1], "w"))
EOF
mkdir -p "$(dirname "$OUT")"
"$PY" "$here/bench.py" render "$R" >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "wrote $OUT"
cat "$R/headline.json" >&2
echo >&2
