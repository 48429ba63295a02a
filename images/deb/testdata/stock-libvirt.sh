#!/usr/bin/env bash
# stock-libvirt.sh QEMU_CONF BIN GUEST SCRATCH: in a private mount namespace
# (run under `unshare -m --propagation private`), start a libvirtd of its own
# that reads QEMU_CONF as its qemu.conf (everything else as Debian installs
# it, with empty state), start BIN/hostd against it with the guest in GUEST,
# and boot a VM with BIN/hostctl. Exit 0: the VM reached its guest agent;
# 1: hostd could not create or boot it (its error on stderr); 2: the set-up
# failed. The machine's own libvirtd, its sockets and state are untouched.
set -uo pipefail
[ $# -eq 4 ] || { echo "usage: stock-libvirt.sh QEMU_CONF BIN GUEST SCRATCH" >&2; exit 2; }
conf=$1 bin=$2 guest=$3 s=$4
setup() { "$@" || { echo "stock-libvirt.sh: $* failed" >&2; exit 2; }; }
virsh() { command virsh -c qemu:///system -q "$@"; }

for d in /run/libvirt /etc/libvirt/qemu /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
	setup mount -t tmpfs tmpfs "$d"
done
setup mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu
setup mount --bind "$conf" /etc/libvirt/qemu.conf

cleanup() {
	[ -n "${hostd:-}" ] && kill "$hostd" 2>/dev/null && wait "$hostd" 2>/dev/null
	for n in $(virsh list --name 2>/dev/null); do virsh destroy "$n" >/dev/null 2>&1; done
	for f in "$s/libvirtd.pid" "$s/virtlogd.pid"; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
}
trap cleanup EXIT
setup virtlogd -d -p "$s/virtlogd.pid"
setup libvirtd -d -p "$s/libvirtd.pid"
# The first start probes QEMU's capabilities (about 8 s here).
for _ in $(seq 1 240); do virsh version >/dev/null 2>&1 && break; sleep 0.5; done
setup virsh version >/dev/null

cat >"$s/hostd.toml" <<CONF
state_dir = "$s/state"
run_dir = "$s/run"
[api]
socket = "$s/run/hostd.sock"
[hypervisor]
accel = "tcg"
[guest]
kernel = "$guest/vmlinuz"
initrd = "$guest/initrd.img"
[dataplane]
pin_path = ""
[log]
format = "text"
CONF
"$bin/hostd" -config "$s/hostd.toml" >"$s/hostd.log" 2>&1 &
hostd=$!
export HOSTD_SOCKET=$s/run/hostd.sock
for _ in $(seq 1 120); do "$bin/hostctl" host >/dev/null 2>&1 && break; sleep 0.5; done
setup "$bin/hostctl" host >/dev/null
"$bin/hostctl" vm create stock-vm -memory 128 >/dev/null || exit 1
"$bin/hostctl" vm wait-ready stock-vm -timeout 2m || exit 1
echo "qemu runs as: $(ps -o user= -p "$(pgrep -f 'guest=stock-vm' | head -n1)")"
"$bin/hostctl" vm destroy stock-vm >/dev/null
"$bin/hostctl" vm delete stock-vm >/dev/null
