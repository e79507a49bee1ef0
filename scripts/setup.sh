#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine, as root: system packages,
# kernel headers findable by bcc, and a virtualenv with the Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
STAMP=$VENV/.setup-stamp

APT_PACKAGES=(
  iptables iproute2 procps psmisc curl ca-certificates tcpdump iperf3 stunnel4 conntrack
  iputils-ping ethtool wrk haproxy shellcheck containernetworking-plugins ipset
  python3-bpfcc bpfcc-tools libbpf-dev bpftool clang llvm linux-headers-amd64 prometheus
)

need_apt=0
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || { need_apt=1; break; }
done
if [ "$need_apt" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then echo "setup: installing system packages needs root" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
fi

# bcc looks for headers of the running kernel; Debian ships 6.1 headers split in two
# trees (-amd64, -common). A merged symlink farm under .cache, pointed to by
# BCC_KERNEL_SOURCE, works without touching /lib/modules.
KH=$ROOT/.cache/kheaders
if [ ! -e "$KH/include/linux/kconfig.h" ]; then
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  if [ -n "$common" ] && [ -n "$arch" ]; then
    rm -rf "$KH"; mkdir -p "$KH"
    cp -rs "$common/." "$KH/"
    cp -rsf "$arch/." "$KH/"
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# bcc's Python package is pure Python over libbcc; expose only it (not all of dist-packages).
mkdir -p "$ROOT/.cache/syspkgs"
ln -sfn /usr/lib/python3/dist-packages/bcc "$ROOT/.cache/syspkgs/bcc"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$ROOT/.cache/syspkgs" > "$site/nodeagent-syspkgs.pth"

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e '.[dev]'
  touch "$STAMP"
fi
echo "setup: ok ($VENV)"
