#!/usr/bin/env bash
# Turns a Debian 12 machine into a blanket host: the second-layer hypervisor
# (QEMU + libvirt), the tools hostd's tests and benches use, and a running
# libvirtd. Idempotent: a machine that is already provisioned costs ~1 s.
#
# On a real blanket image the distribution's units run libvirtd; on machines
# where systemd is not PID 1 (CI containers, these build hosts) this script
# does by hand what libvirt-daemon-system's postinst would, as recorded in
# shared/design.md: users and groups, qemu.conf, directories, `libvirtd -d`.
set -euo pipefail

PKGS=(
  # building hostd: cgo for the libvirt driver, git for the version stamp
  # (Go itself comes from /usr/local/go: images/blanket/check-go.sh)
  make gcc pkg-config git
  # second-layer hypervisor
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86 qemu-utils
  # guest image build (images/guest)
  busybox-static cpio xz-utils zstd
  # memory plane, dataplane, systemd checks
  fuse3 iproute2 ethtool clang llvm libbpf-dev systemd
  # misc tools used by tests
  curl ca-certificates openssl
)

log() { printf 'provision: %s\n' "$*" >&2; }

install_packages() {
  local missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

configure_libvirt() {
  mkdir -p /var/log/libvirt/qemu /var/lib/libvirt /var/cache/libvirt /run/libvirt
  # libvirt resolves its default user before it reads qemu.conf, so the
  # accounts libvirt-daemon-system would create must exist.
  getent group kvm >/dev/null || groupadd --system kvm
  getent group libvirt >/dev/null || groupadd --system libvirt
  getent group libvirt-qemu >/dev/null || groupadd --system --gid 64055 libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd --system --uid 64055 --gid kvm --home-dir /var/lib/libvirt --no-create-home \
      --shell /usr/sbin/nologin libvirt-qemu
  local conf=/etc/libvirt/qemu.conf marker='# hostd: blanket host settings'
  if ! grep -qF "$marker" "$conf" 2>/dev/null; then
    mkdir -p /etc/libvirt
    cat >>"$conf" <<CONF
$marker
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
CONF
  fi
}

libvirt_up() { virsh -c qemu:///system version >/dev/null 2>&1; }

start_libvirtd() {
  libvirt_up && return 0
  log "starting libvirtd"
  libvirtd -d
  # The first start probes QEMU's capabilities (~8 s here); bounded wait.
  for _ in $(seq 1 120); do
    libvirt_up && return 0
    sleep 0.5
  done
  log "libvirtd did not answer within 60 s; see /var/log/libvirt"
  return 1
}

install_packages
configure_libvirt
start_libvirtd
log "ready"
