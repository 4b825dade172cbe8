#!/usr/bin/env bash
# Incremental sync (issue 17), side by side: on a generated 32 MB configuration repository served
# over git's smart HTTP (git-http-backend behind githttp.py, which counts the bytes it sends),
# N one-line commits, each followed by
#   - `stackless-init sync` on a root that booted from the repository, and
#   - `git fetch` + `git reset --hard` in a persistent clone (the floor),
# measuring wall clock and CPU (bench.py cpu), bytes sent by the server, and the new bytes on
# disk (`du -sb` counts a hard-linked file once).
#
#   scripts/bench/incremental.sh BIN EMULATOR WORKDIR RUNS > result.json
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
BIN=$1 EMU=$2 W=$3 RUNS=$4
PY="$repo/.venv/bin/python"
mkdir -p "$W"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
say() { echo "[incremental] $*" >&2; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
g() { git -C "$1" -c user.name=bench -c user.email=bench@example.com "${@:2}"; }

# --- the repository: 300 files of 130 KB of base64 text (incompressible beyond base64's 3/4) ----
say "generating the repository"
git init -q --bare -b main "$W/srv/big.git"
git init -q -b main "$W/work"
"$PY" - "$W/work" <<'EOF'
import base64, os, sys
d = sys.argv[1]
for i in range(300):
    sub = os.path.join(d, f"app{i % 10}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"f{i:03}.conf"), "wb") as f:
        f.write(base64.encodebytes(os.urandom(97_500)))
EOF
g "$W/work" add -A
g "$W/work" commit -q -m "300 files"
g "$W/work" push -q "$W/srv/big.git" HEAD:refs/heads/main
packed=$(du -sb "$W/srv/big.git/objects" | cut -f1)

# --- smart HTTP with a byte count ------------------------------------------------------------------
port=$(free_port)
"$PY" "$here/githttp.py" "$W/srv" "$port" "$W/served" 2>"$W/githttp.err" &
pids+=($!)
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
URL="http://127.0.0.1:$port/git/big.git"
served() { cat "$W/served"; }

# --- the contenders, after their first fetch -------------------------------------------------------
say "first boot and first clone"
printf 'minion_id = "bench-incremental"\n[config]\nrepo = "%s"\n[sync]\nschedule = "@every 15m"\n[report]\nenabled = false\n' "$URL" >"$W/ud.toml"
eport=$(free_port)
"$EMU" --listen "127.0.0.1:$eport" --user-data "$W/ud.toml" >"$W/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$eport") 2>/dev/null && break; sleep 0.05; done
AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:$eport" "$BIN" --root "$W/agent" boot --once >"$W/boot.log" 2>&1 ||
    { tail -5 "$W/boot.log" >&2; exit 1; }
first_agent=$(served)
git clone -q "$URL" "$W/clone"
first_clone=$(($(served) - first_agent))
store="$W/agent/var/lib/stackless/repos/config"

line=0
one_line_commit() {
    line=$((line + 1))
    local f="$W/work/app2/f042.conf"
    sed -i "${line}s/^./#/" "$f"
    g "$W/work" commit -q -am "one line ($line)"
    g "$W/work" push -q "$W/srv/big.git" HEAD:refs/heads/main
}
measure() { # NAME DISKDIR ARGV... → one JSON object
    local name=$1 disk=$2
    shift 2
    local b0 d0 cpu
    b0=$(served) d0=$(du -sb "$disk" | cut -f1)
    cpu=$("$PY" "$here/bench.py" cpu --runs 1 --warmup 0 -- "$@")
    printf '{"name": "%s", "cpu": %s, "bytes": %s, "disk": %s}' "$name" "$cpu" \
        $(($(served) - b0)) $(($(du -sb "$disk" | cut -f1) - d0))
}

say "$RUNS one-line commits"
{
    printf '{"packed_bytes": %s, "first_agent_bytes": %s, "first_clone_bytes": %s, "runs": [' \
        "$packed" "$first_agent" "$first_clone"
    for i in $(seq "$RUNS"); do
        ((i > 1)) && printf ', '
        one_line_commit
        # Alternate who goes first, so neither always meets a warm page cache.
        if ((i % 2)); then
            printf '[%s, ' "$(measure agent "$store" "$BIN" --root "$W/agent" sync)"
            printf '%s]' "$(measure git "$W/clone" sh -c "git -C '$W/clone' fetch -q origin main && git -C '$W/clone' reset -q --hard FETCH_HEAD")"
        else
            printf '[%s, ' "$(measure git "$W/clone" sh -c "git -C '$W/clone' fetch -q origin main && git -C '$W/clone' reset -q --hard FETCH_HEAD")"
            printf '%s]' "$(measure agent "$store" "$BIN" --root "$W/agent" sync)"
        fi
    done
    printf ']}\n'
} >"$W/incremental.json"
# Both ended on the same files.
diff -r -x .git "$W/clone" "$store/current/" >/dev/null || { say "the release differs from the clone"; exit 1; }
cat "$W/incremental.json"
