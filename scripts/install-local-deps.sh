#!/usr/bin/env bash
# Installs what the local target needs on Debian 12: debootstrap, e2fsprogs (mke2fs -d), and
# qemu from bookworm-backports. The main archive's qemu-system-x86 would replace a newer
# qemu-utils from backports, so both come from backports. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in debootstrap e2fsprogs git; do have "$p" || missing+=("$p"); done
need_qemu=0
have qemu-system-x86 || need_qemu=1
have qemu-utils || need_qemu=1

if ((${#missing[@]} == 0 && need_qemu == 0)); then
    exit 0
fi

if ((need_qemu)) && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "install-local-deps: adding bookworm-backports to apt's sources" >&2
    cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq
if ((${#missing[@]})); then
    echo "install-local-deps: apt-get install ${missing[*]}" >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ((need_qemu)); then
    echo "install-local-deps: apt-get install -t bookworm-backports qemu-system-x86 qemu-utils" >&2
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
fi
