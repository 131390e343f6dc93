#!/bin/sh
# Install pcapvault and everything it needs on a Debian machine (run as root).
#   ./setup.sh                 runtime: libpcap, tcpdump, a venv in /opt/pcapvault, tools on PATH
#   ./setup.sh --test          also the test tools (tshark, trafgen, tcpreplay, pytest, ruff,
#                              headless chromium and chromium-driver for the web page's tests)
#   ./setup.sh --system IFACE  also install the systemd units and enable recorder@IFACE and
#                              npcapserve (HTTPS; a self-signed pair in /etc/pcapvault/tls
#                              when there is none)
#   ./setup.sh --fleet         also the fleet's catalogue engines (chdb, clickhouse-connect) for
#                              npcapfleet, on the machine that asks the sensors (docs/FLEET.md)
#   ./setup.sh --uninstall     remove the venv, the links and the units (recorded data stays)
set -eu
cd "$(dirname "$0")"
PREFIX=${PCAPVAULT_PREFIX:-/opt/pcapvault}
TOOLS="recorder npcapextract npcapextractd npcapindex npcapprintindex npcapdecompress npcaprepair disk2n npcapserve npcapflows npcapmanage npcapimport npcapfleet"
export DEBIAN_FRONTEND=noninteractive

test_deps=no
fleet_deps=no
system_iface=
case "${1:-}" in
  --test) test_deps=yes ;;
  --fleet) fleet_deps=yes ;;
  --system) system_iface=${2:?usage: ./setup.sh --system IFACE} ;;
  --uninstall)
    systemctl disable --now 'recorder@*' npcapextract.socket npcapserve 2>/dev/null || true
    for unit in systemd/*.service systemd/*.socket systemd/*.timer; do
      rm -f "/etc/systemd/system/$(basename "$unit")"
    done
    rm -f /etc/sysusers.d/pcapvault.conf /etc/tmpfiles.d/pcapvault.conf /etc/pam.d/npcapextract
    for t in $TOOLS; do rm -f "/usr/local/bin/$t"; done
    rm -rf "$PREFIX"
    echo "pcapvault removed; recorded data under /var/lib/pcapvault is kept"
    exit 0 ;;
  "") ;;
  *) echo "usage: ./setup.sh [--test | --fleet | --system IFACE | --uninstall]" >&2; exit 2 ;;
esac

pkgs="python3 python3-venv python3-pip libpcap0.8 tcpdump iproute2 libpam0g openssl"
if [ "$test_deps" = yes ]; then
  pkgs="$pkgs tshark netsniff-ng tcpreplay zstd systemd procps util-linux passwd"
  pkgs="$pkgs chromium chromium-driver"  # tests/server/test_web*.py drive the page in it
fi
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends $pkgs
fi

# Debian's own interpreter, not whatever python3 comes first on PATH: the service accounts
# (pcapvault, and the users the tests drop to) must be able to run it, and an interpreter
# under /root or a home directory would not be readable by them.
case "$(readlink -f "$PREFIX/bin/python" 2>/dev/null)" in
  /usr/bin/*) ;;
  *) rm -rf "$PREFIX"; /usr/bin/python3 -m venv "$PREFIX" ;;
esac
"$PREFIX/bin/pip" install -q --upgrade pip
if [ "$test_deps" = yes ]; then
  "$PREFIX/bin/pip" install -q ".[test]"  # the fleet's engines included
elif [ "$fleet_deps" = yes ]; then
  "$PREFIX/bin/pip" install -q ".[fleet]"
else
  "$PREFIX/bin/pip" install -q .
fi
for t in $TOOLS; do
  [ -x "$PREFIX/bin/$t" ] && ln -sf "$PREFIX/bin/$t" "/usr/local/bin/$t"
done
echo "pcapvault installed in $PREFIX; tools linked into /usr/local/bin"

if [ -n "$system_iface" ]; then
  for unit in systemd/*.service systemd/*.socket systemd/*.timer; do
    install -m 0644 "$unit" /etc/systemd/system/
  done
  install -D -m 0644 systemd/sysusers.d/pcapvault.conf /etc/sysusers.d/pcapvault.conf
  install -D -m 0644 systemd/tmpfiles.d/pcapvault.conf /etc/tmpfiles.d/pcapvault.conf
  install -D -m 0644 systemd/pam.d/npcapextract /etc/pam.d/npcapextract
  systemd-sysusers /etc/sysusers.d/pcapvault.conf
  systemd-tmpfiles --create /etc/tmpfiles.d/pcapvault.conf
  conf=/etc/pcapvault/recorder-$system_iface.conf
  if [ ! -e "$conf" ]; then
    printf -- '-i=%s\n-o=/var/lib/pcapvault/%s\n--disk-limit=80%%\n' \
      "$system_iface" "$system_iface" > "$conf"
  fi
  # npcapserve's TLS pair: a self-signed one unless the administrator has put one there.
  tls=/etc/pcapvault/tls
  if [ ! -e "$tls/cert.pem" ] && [ ! -e "$tls/key.pem" ]; then
    install -d -m 0755 "$tls"
    fqdn=$(hostname -f 2>/dev/null || hostname)
    (umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -days 825 -subj "/CN=$fqdn" \
      -addext "subjectAltName=DNS:$fqdn,DNS:$(hostname),DNS:localhost,IP:127.0.0.1" \
      -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null)
    chmod 0644 "$tls/cert.pem"
    echo "npcapserve: self-signed certificate $tls/cert.pem (give it to clients as their CA)"
  fi
  conf=/etc/pcapvault/npcapserve.conf
  if [ ! -e "$conf" ]; then
    printf -- '--tls-cert=%s/cert.pem\n--tls-key=%s/key.pem\n' "$tls" "$tls" > "$conf"
  fi
  if systemctl daemon-reload 2>/dev/null; then
    systemctl enable --now "recorder@$system_iface"
    systemctl enable --now npcapextract.socket
    systemctl enable --now npcapserve
    echo "recorder@$system_iface enabled; logs: journalctl -u recorder@$system_iface"
  else
    echo "systemd is not running here; units installed, start later with:"
    echo "  systemctl enable --now recorder@$system_iface"
    echo "  systemctl enable --now npcapextract.socket"
    echo "  systemctl enable --now npcapserve"
  fi
fi
