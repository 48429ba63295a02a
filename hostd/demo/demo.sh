#!/usr/bin/env bash
# make demo: hostd's main job on its embedded default, end to end on this
# machine. Three private hostds, each with its own state directory and
# socket: a backup (the backup role, mutual TLS on loopback) and two hosts,
# A and B. On A a nested VM is created on served memory, a seeded workload
# is written in the guest, the VM is protected (continuous checkpointing,
# bound 10 s) and evacuated; on B it is restored lazily and its memory is
# checked against the seeded pattern. The figures are printed. Everything
# it started is stopped at the end. Expects `make provision guest build`
# (the Makefile runs them first). (The tests do the same with each hostd in
# a network namespace of its own; see hostd/integration.)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/build/bin
guest=$root/build/guest
demo=$(mktemp -d /tmp/hostd-demo.XXXXXX)
vmname=demo-vm
port=$((17000 + RANDOM % 2000))
pids=()
say() { printf '\n== %s\n' "$*"; }
ctl() { local who=$1; shift; "$bin/hostctl" -socket "$demo/$who/run/hostd.sock" "$@"; }

cleanup() {
  set +e
  for who in b a; do
    [ -S "$demo/$who/run/hostd.sock" ] && ctl "$who" vm delete "$vmname" >/dev/null 2>&1
  done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  virsh -q -c qemu:///system destroy "$vmname" >/dev/null 2>&1
  virsh -q -c qemu:///system undefine "$vmname" >/dev/null 2>&1
  # Memory servers outlive hostd by design; the demo's go with it.
  pkill -f "memserve -config $demo/" 2>/dev/null
  grep -o " $demo/[^ ]*" /proc/mounts | xargs -r -n1 umount -l 2>/dev/null
  [ -n "${KEEP:-}" ] || rm -rf "$demo"
}
trap cleanup EXIT

"$bin/mkpki" -dir "$demo/pki" -server 127.0.0.1 -hosts hostA,hostB >/dev/null

# conf WHO ROLE [HOSTNAME]: a hostd configuration in $demo/WHO.
conf() {
  local who=$1 role=$2 host=${3:-}
  mkdir -p "$demo/$who"
  cat >"$demo/$who/hostd.toml" <<CONF
roles = ["$role"]
state_dir = "$demo/$who/state"
run_dir = "$demo/$who/run"
[api]
socket = "$demo/$who/run/hostd.sock"
[hypervisor]
accel = "auto"
[guest]
kernel = "$guest/vmlinuz"
initrd = "$guest/initrd.img"
[checkpoint]
tls = { ca = "$demo/pki/ca.crt", cert = "$demo/pki/client-$host.crt", key = "$demo/pki/client-$host.key" }
[backup]
listen = "127.0.0.1:$port"
tls = { ca = "$demo/pki/ca.crt", cert = "$demo/pki/server.crt", key = "$demo/pki/server.key" }
[log]
format = "text"
CONF
  [ -n "$host" ] || sed -i '/^\[checkpoint\]/,/^tls/d' "$demo/$who/hostd.toml"
}

start() {
  local who=$1
  "$bin/hostd" -config "$demo/$who/hostd.toml" 2>"$demo/$who/hostd.log" &
  pids+=($!)
  for _ in $(seq 1 600); do
    ctl "$who" host >/dev/null 2>&1 && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$demo/$who/hostd.log"; echo "demo: hostd $who exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "demo: hostd $who did not answer" >&2
  exit 1
}

conf backup backup
conf a host hostA
conf b host hostB
say "starting a backup and hosts A and B (logs in $demo/*/hostd.log); accel=auto probes whether KVM really boots Linux"
start backup
start a
start b
ctl a host

say "A: create $vmname on served memory (256 MiB) and boot it"
ctl a vm create "$vmname" -memory 256 -served
ctl a vm wait-ready "$vmname" -timeout 3m >/dev/null
boot_ms=$(ctl a -json vm get "$vmname" | sed -n 's/.*"boot_ms": \([0-9.]*\).*/\1/p')

say "A: the guest writes a 48 MiB seeded pattern (3 passes), then keeps dirtying 16 MiB at 4 MiB/s"
ctl a vm agent "$vmname" dirty '{"region":"a","size_mib":48,"seed":7,"passes":3}' >/dev/null
for _ in $(seq 1 600); do
  ctl a vm agent "$vmname" ops '{"region":"a"}' | grep -q '"running":false' && break
  sleep 0.2
done
ctl a vm agent "$vmname" dirty '{"region":"live","size_mib":16,"seed":9,"rate_mib_s":4}' >/dev/null

say "A: PUT protection (backup 127.0.0.1:$port, bound 10s); the first full copy is a job"
ctl a protect "$vmname" -backup "127.0.0.1:$port" -bound 10s -wait
sleep 3
ctl a protection "$vmname"

say "A: evacuate within the bound (pause, final flush, device state, restorable commit), then power it off"
ctl a -json evacuate "$vmname" -within 10s -after destroy -wait >"$demo/evac.json"
sed -n '/"report"/,/^  }/p' "$demo/evac.json"
grep -q '"state": "succeeded"' "$demo/evac.json" || { grep '"error"' "$demo/evac.json"; exit 1; }

say "A: delete $vmname (the spot host is going away; the backup keeps its restore point)"
ctl a vm delete "$vmname"

say "B: restore $vmname lazily from the backup (resumes at once; pages on demand and prefetched)"
ctl b -json restore "$vmname" -backup "127.0.0.1:$port" -wait >"$demo/restore.json"
sed -n '/"report"/,/^  }/p' "$demo/restore.json"
grep -q '"state": "succeeded"' "$demo/restore.json" || { grep '"error"' "$demo/restore.json"; exit 1; }

say "B: the restored guest's memory against the seeded patterns"
ctl b vm verify "$vmname" a
ctl b vm agent "$vmname" stop '{"region":"live"}' >/dev/null
ctl b vm verify "$vmname" live
ctl b vm list

num() { sed -n "s/.*\"$1\": \\([0-9.e+-]*\\).*/\\1/p" "$2" | head -1; }
say "figures"
echo "demo: boot_ms (A: start to agent ready) $boot_ms"
echo "demo: evacuation_ms $(num total_ms "$demo/evac.json") of bound_ms $(num bound_ms "$demo/evac.json") (bound held: $(sed -n 's/.*"bound_held": \([a-z]*\).*/\1/p' "$demo/evac.json" | head -1))"
echo "demo: evacuation_pause_ms $(num pause_ms "$demo/evac.json")"
echo "demo: lazy_resume_ms (B: restore call to guest running) $(num resume_ms "$demo/restore.json")"
echo "demo: resident_ms (B: until every page is local) $(num resident_ms "$demo/restore.json")"
echo "demo: bytes_fetched $(num bytes_fetched "$demo/restore.json")"
echo "demo: memory intact: region checksums verified above"

say "deleting $vmname and stopping the hostds"
ctl b vm delete "$vmname"
