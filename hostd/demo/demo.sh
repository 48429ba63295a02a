#!/usr/bin/env bash
# make demo: hostd's main job on its embedded default, end to end on this
# machine. Starts a private hostd (own state dir and socket), creates a
# nested VM through the socket with hostctl, waits for its guest agent,
# shows the console and the measured boot time, shuts it down, and stops
# everything it started. Expects `make provision guest build` (the Makefile
# runs them first).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/build/bin
guest=$root/build/guest
demo=$(mktemp -d /tmp/hostd-demo.XXXXXX)
sock=$demo/run/hostd.sock
vmname=demo-vm
hostctl() { "$bin/hostctl" -socket "$sock" "$@"; }
say() { printf '\n== %s\n' "$*"; }

cleanup() {
  set +e
  if [ -S "$sock" ]; then hostctl vm delete "$vmname" >/dev/null 2>&1; fi
  if [ -n "${hostd_pid:-}" ]; then kill -TERM "$hostd_pid" 2>/dev/null; wait "$hostd_pid" 2>/dev/null; fi
  virsh -q -c qemu:///system destroy "$vmname" >/dev/null 2>&1
  virsh -q -c qemu:///system undefine "$vmname" >/dev/null 2>&1
  rm -rf "$demo"
}
trap cleanup EXIT

cat >"$demo/hostd.toml" <<CONF
state_dir = "$demo/state"
run_dir = "$demo/run"
[api]
socket = "$sock"
[hypervisor]
accel = "auto"
[guest]
kernel = "$guest/vmlinuz"
initrd = "$guest/initrd.img"
[log]
format = "text"
CONF

say "starting hostd (log: $demo/hostd.log); accel=auto probes whether KVM really boots Linux"
"$bin/hostd" -config "$demo/hostd.toml" 2>"$demo/hostd.log" &
hostd_pid=$!
for _ in $(seq 1 600); do
  hostctl host >/dev/null 2>&1 && break
  kill -0 "$hostd_pid" 2>/dev/null || { cat "$demo/hostd.log"; echo "demo: hostd exited" >&2; exit 1; }
  sleep 0.1
done

say "GET /v1/host"
hostctl host

say "POST /v1/vms: create $vmname (256 MiB, 1 vCPU, the test guest)"
t0=$(date +%s%N)
hostctl vm create "$vmname" -memory 256
hostctl vm wait-ready "$vmname" -timeout 3m >/dev/null
t1=$(date +%s%N)

say "GET /v1/vms"
hostctl vm list

say "console (last 12 lines)"
hostctl vm console "$vmname" -n 12

say "stats"
hostctl vm stats "$vmname"

boot_ms=$(hostctl -json vm get "$vmname" | sed -n 's/.*"boot_ms": \([0-9.]*\).*/\1/p')
say "ACPI shutdown (a job)"
if ! hostctl vm shutdown "$vmname" -timeout 60s -wait; then
  echo "the guest did not power off; destroying it"
  hostctl vm destroy "$vmname"
fi

say "figures"
echo "demo: boot_ms (hostd: start to agent ready) $boot_ms"
echo "demo: create_to_ready_ms (hostctl, incl. polling) $(( (t1 - t0) / 1000000 ))"
hostctl metrics | grep -E '^hostd_(vms|api_requests_total)' | head -8

say "deleting $vmname and stopping hostd (guests are never stopped by a hostd stop)"
hostctl vm delete "$vmname"
