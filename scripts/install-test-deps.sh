#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine. Idempotent: a second run only
# checks. Python tools go into a virtualenv inside the repository (.venv, git-ignored).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo/.venv"
stamp="$venv/.stackless-deps"

# Bump when the pinned set changes so existing checkouts reinstall.
want="v1 salt==3008.4 supervisor==4.3.0 moto[server]==5.2.5"

# openssh-server, openssh-client, lighttpd, lighttpd-mod-openssl, openssl: the private-repository
# tests (init/tests/private_repos.rs) run a real sshd with git-shell and git-http-backend behind TLS.
# clang-14, llvm-14: the aarch64 agent's C (ring) and llvm-ar (scripts/aarch64-toolchain.sh);
# qemu-user-static: its library tests run under qemu-aarch64-static (scripts/test-aarch64.sh).
apt_pkgs=(git gcc python3-dev python3-venv musl-tools inotify-tools curl ca-certificates gnupg
    openssh-server openssh-client lighttpd lighttpd-mod-openssl openssl
    clang-14 llvm-14 qemu-user-static)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-test-deps: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    if ! rustup target list --installed 2>/dev/null | grep -qx "$t"; then
        echo "install-test-deps: rustup target add $t" >&2
        rustup target add "$t"
    fi
done

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
echo "install-test-deps: creating $venv (salt builds timelib from source; a few minutes once)" >&2
[[ -x "$venv/bin/python" ]] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip wheel setuptools
# shellcheck disable=SC2086
"$venv/bin/pip" install -q ${want#v1 }
echo "$want" >"$stamp"
