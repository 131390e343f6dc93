#!/bin/sh
# Install pcapvault and everything it needs on a Debian machine (run as root).
#   ./setup.sh                 runtime: libpcap, tcpdump, a venv in /opt/pcapvault, tools on PATH
#   ./setup.sh --test          also the test tools (tshark, trafgen, tcpreplay, pytest, ruff)
#   ./setup.sh --system IFACE  also install the systemd units and enable recorder@IFACE
#   ./setup.sh --uninstall     remove the venv, the links and the units (recorded data stays)
set -eu
cd "$(dirname "$0")"
PREFIX=${PCAPVAULT_PREFIX:-/opt/pcapvault}
TOOLS="recorder npcapextract npcapindex npcapprintindex npcapdecompress npcaprepair disk2n"
export DEBIAN_FRONTEND=noninteractive

test_deps=no
system_iface=
case "${1:-}" in
  --test) test_deps=yes ;;
  --system) system_iface=${2:?usage: ./setup.sh --system IFACE} ;;
  --uninstall)
    for t in $TOOLS; do rm -f "/usr/local/bin/$t"; done
    rm -rf "$PREFIX"
    echo "pcapvault removed; recorded data under /var/lib/pcapvault is kept"
    exit 0 ;;
  "") ;;
  *) echo "usage: ./setup.sh [--test | --system IFACE | --uninstall]" >&2; exit 2 ;;
esac

pkgs="python3 python3-venv python3-pip libpcap0.8 tcpdump iproute2 libpam0g"
if [ "$test_deps" = yes ]; then
  pkgs="$pkgs tshark netsniff-ng tcpreplay zstd systemd procps util-linux passwd"
fi
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends $pkgs
fi

python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q --upgrade pip
if [ "$test_deps" = yes ]; then
  "$PREFIX/bin/pip" install -q ".[test]"
else
  "$PREFIX/bin/pip" install -q .
fi
for t in $TOOLS; do
  [ -x "$PREFIX/bin/$t" ] && ln -sf "$PREFIX/bin/$t" "/usr/local/bin/$t"
done
echo "pcapvault installed in $PREFIX; tools linked into /usr/local/bin"
