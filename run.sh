#!/usr/bin/env bash
# vmgrid's two entry points, each doing all of its own set-up on Debian 12:
#   ./run.sh demo [ARGS]   the main job: a local grid doing the poster's flows
#   ./run.sh test [ARGS]   the whole test suite (ARGS go to pytest)
#   ./run.sh setup         only the set-up (Debian packages + .venv)
# Idempotent: when everything is installed, set-up costs well under a second.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

# Debian packages vmgrid needs, and why (README.md, "Dependencies").
APT_PACKAGES=(
  python3 python3-venv python3-dev gcc pkg-config   # the virtual environment, building libvirt-python
  libvirt-dev libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu  # the VMM interface
  qemu-system-x86 qemu-utils                         # real guests, qcow2 images and overlays
  genisoimage                                        # isoinfo: an independent reader of the context CD-ROM (tests)
  debootstrap busybox-static cpio e2fsprogs          # building guest images (vmgrid image build)
  syslinux syslinux-common mtools                    # guest images boot by themselves (MBR + syslinux)
  openssl xmlsec1                                    # interop peers for the security tests
  globus-gridftp-server-progs globus-gass-copy-progs globus-proxy-utils  # interop peers (GridFTP, GSI)
  iproute2 curl                                      # network namespaces and the WAN benchmark
  nftables                                           # bridge mode: each guest sends only as its own lease (guard.py)
  nodejs                                             # interop peer node-soap (tests/interop; npm installs it into var/)
  gsoap libgsoap-dev libssl-dev zlib1g-dev           # interop peer gSOAP 2.8: wsdl2h, soapcpp2, the wsse plugin, building its client
  libaxis-java libwss4j-java default-jdk-headless    # interop peer Axis 1.4 + WSS4J 1.6 (GT4 Java WS Core's stack): WSDL2Java, javac
)

log() { printf 'run.sh: %s\n' "$*" >&2; }

ensure_apt() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

pick_python() {
  local c
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  log "Python 3.11 is required (Debian 12's python3)"; exit 1
}

ensure_venv() {
  local stamp want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  stamp=.venv/.vmgrid-installed
  if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
  log "creating the virtual environment .venv"
  [ -x .venv/bin/python ] || "$(pick_python)" -m venv .venv
  if ! { .venv/bin/pip install --disable-pip-version-check --upgrade pip setuptools wheel &&
         .venv/bin/pip install --disable-pip-version-check -e '.[test]'; } >.venv/install.log 2>&1; then
    tail -n 30 .venv/install.log >&2; log "pip failed; the whole log is .venv/install.log"; exit 1
  fi
  echo "$want" > "$stamp"
}

ensure_system() {
  # libvirt's QEMU driver wants this account even when QEMU runs as root (Debian creates it only in
  # libvirt-daemon-system, which vmgrid does not need: it embeds the driver, qemu:///embed).
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  getent passwd libvirt-qemu >/dev/null ||
    $sudo useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
}

compile_sources() {
  # The environment may set PYTHONDONTWRITEBYTECODE: then every vmgrid process the tests and benches start
  # would compile each module it imports (about 1 s of CPU for a serve). Compiled once here; compileall
  # skips what is up to date, so this is fast when nothing changed.
  .venv/bin/python -m compileall -q -j 0 services security gridftp guestd client bench >/dev/null
}

setup() { ensure_apt; ensure_system; ensure_venv; compile_sources; }

check_space() {
  # A whole run writes about 4.4 GB under the temporary directory (guest images, overlays, state; removed as
  # each test passes) and 1.5 GB of guest images under var/: say so before a full disk fails tests one by one.
  local d free
  for d in "${TMPDIR:-/tmp}" "$ROOT"; do
    free=$(df -Pk "$d" | awk 'NR==2 {print int($4 / 1048576)}')
    [ "$free" -ge 8 ] || log "warning: ${free} GiB free on $d; the whole test suite needs about 8 GiB"
  done
}

cmd=${1:-}; [ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$ROOT/.venv/bin/vmgrid" demo "$@" ;;
  test)  setup; check_space; exec "$ROOT/.venv/bin/python" -m pytest "$@" ;;
  *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
