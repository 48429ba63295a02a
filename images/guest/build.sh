#!/usr/bin/env bash
# build.sh OUTDIR: build hostd's nested test guest from Debian packages.
#
# Produces OUTDIR/vmlinuz (Debian cloud kernel), OUTDIR/initrd.img (newc cpio,
# gzip: busybox-static, the virtio modules, /init and the static guest agent)
# and OUTDIR/guest.json (what went in, sizes, hashes). Packages are fetched
# with apt-get download and unpacked with dpkg-deb -x: nothing is installed
# except cpio when missing. The result is cached: when the kernel and busybox
# package versions, the agent sources, this script, /init and the Go version
# (and the versions of the modules it imports) are unchanged, it returns at
# once. The initramfs is reproducible: every timestamp is SOURCE_DATE_EPOCH
# (default: the kernel image's own mtime in its package), entries are sorted
# and owned by root, inode numbers zeroed.
set -euo pipefail

die() { echo "build.sh: $*" >&2; exit 1; }
# Exit status 3: the Debian packages could not be resolved or downloaded (no
# apt sources, no network). Callers such as tests may skip on it.
unavailable() { echo "build.sh: $*" >&2; exit 3; }
[ $# -eq 1 ] || die "usage: build.sh OUTDIR"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
export PATH="$PATH:/usr/local/go/bin"
GO=${GO:-go}
command -v "$GO" >/dev/null || die "Go toolchain not found (set GO= or install Go into /usr/local/go)"

# Modules the guest loads; their dependencies come from modules.dep.
modules="virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
virtio_net net_failover failover virtio_blk virtio_console virtio_balloon 8021q
button evdev"
kmeta=linux-image-cloud-amd64

# One build at a time per OUTDIR: parallel test packages all call us.
exec 9>"$out/.lock"
flock 9

# Resolving package versions costs apt-cache about a second (this image keeps
# no pkgcache.bin), too slow for a cached build; the answer only changes
# with the apt lists and sources, so it is cached against their fingerprint.
aptstate() {
	{ stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* /etc/apt/sources.list \
		/etc/apt/sources.list.d/* /etc/apt/preferences* /etc/apt/preferences.d/* 2>/dev/null || true; } |
		sha256sum | cut -c1-64
}
# resolve: the kernel package behind the meta package, and the candidate
# versions, in one apt-cache call. Prints "KPKG KVER BBVER" or nothing.
resolve() {
	apt-cache show --no-all-versions "$kmeta" busybox-static 2>/dev/null | awk -v meta="$kmeta" '
		/^Package:/ { p = $2 }
		/^Version:/ && p == meta { kver = $2 }
		/^Version:/ && p == "busybox-static" { bbver = $2 }
		/^Depends:/ && p == meta && match($0, /linux-image-[0-9][^ ,]*/) { kpkg = substr($0, RSTART, RLENGTH) }
		END { if (kpkg != "" && kver != "" && bbver != "") print kpkg, kver, bbver }'
}
state=$(aptstate)
resolved=""
if [ -f "$out/.resolved" ] && [ "$(head -n1 "$out/.resolved")" = "$state" ]; then
	resolved=$(sed -n 2p "$out/.resolved")
fi
if [ -z "$resolved" ]; then
	resolved=$(resolve)
	if [ -z "$resolved" ]; then
		apt-get update -qq >/dev/null || unavailable "apt-get update failed"
		state=$(aptstate)
		resolved=$(resolve)
	fi
	[ -n "$resolved" ] || unavailable "cannot resolve $kmeta (and the kernel package it depends on) or busybox-static from the apt sources"
	printf '%s\n%s\n' "$state" "$resolved" >"$out/.resolved"
fi
read -r kpkg kver bbver <<<"$resolved"

srchash=$(cd "$root" && find images/guest/agent images/guest/agentapi -name '*.go' ! -name '*_test.go' -print0 |
	LC_ALL=C sort -z | xargs -0 sha256sum |
	cat - <("$GO" list -mod=mod -deps -f '{{with .Module}}{{.Path}}@{{.Version}}{{end}}' ./images/guest/agent | LC_ALL=C sort -u) |
	sha256sum | cut -c1-64) || die "hashing the agent sources failed (go list ./images/guest/agent)"
scripthash=$(cat "$here/build.sh" "$here/init" | sha256sum | cut -c1-64)
inputs="kernel=$kpkg=$kver busybox-static=$bbver agent=$srchash script=$scripthash go=$("$GO" env GOVERSION)"
if [ -f "$out/.inputs" ] && [ "$(cat "$out/.inputs")" = "$inputs" ] &&
	[ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/guest.json" ]; then
	echo "guest: up to date in $out"
	exit 0
fi
start=$(date +%s.%N)

if ! command -v cpio >/dev/null; then
	apt-get install -y -qq --no-install-recommends cpio >/dev/null ||
		{ apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends cpio >/dev/null; } ||
		die "cpio (GNU, for --reproducible) is missing and apt-get install cpio failed"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
debs="$out/debs"
mkdir -p "$debs"
# _apt downloads into the directory itself; let it.
chmod 777 "$debs"
# debfile PKG VERSION: the file name apt-get download gives (epoch ':' -> %3a).
debfile() { echo "$debs/${1}_${2//:/%3a}_amd64.deb"; }
for pv in "$kpkg=$kver" "busybox-static=$bbver"; do
	f=$(debfile "${pv%%=*}" "${pv#*=}")
	[ -f "$f" ] && continue
	(cd "$debs" && apt-get download -qq "$pv") || unavailable "apt-get download $pv failed"
	[ -f "$f" ] || die "apt-get download $pv did not produce $f"
done
# Only the current versions stay in the cache.
find "$debs" -name '*.deb' ! -name "$(basename "$(debfile "$kpkg" "$kver")")" \
	! -name "$(basename "$(debfile busybox-static "$bbver")")" -delete

dpkg-deb -x "$(debfile "$kpkg" "$kver")" "$tmp/kernel"
dpkg-deb -x "$(debfile busybox-static "$bbver")" "$tmp/busybox"
busybox="$tmp/busybox/bin/busybox"
[ -x "$busybox" ] || die "busybox-static $bbver has no bin/busybox"
krel=$(ls "$tmp/kernel/lib/modules")
[ "$(echo "$krel" | wc -l)" -eq 1 ] || die "$kpkg: expected one module tree, found: $krel"
vmlinuz="$tmp/kernel/boot/vmlinuz-$krel"
[ -f "$vmlinuz" ] || die "$kpkg: no boot/vmlinuz-$krel"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$vmlinuz")}

# The package ships no modules.dep (depmod runs at install); busybox's
# depmod builds it from the unpacked tree.
mdir="$tmp/kernel/lib/modules/$krel"
"$busybox" depmod -b "$tmp/kernel" "$krel" || die "depmod $krel failed"
# Depth-first over modules.dep: each module after everything it needs.
order=$(awk -v want="$modules" -v builtin="$mdir/modules.builtin" '
	BEGIN { while ((getline l < builtin) > 0) { n = l; sub(/.*\//, "", n); sub(/\.ko$/, "", n); inkernel[n] = 1 } }
	{
		k = $1; sub(/:$/, "", k)
		n = k; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n)
		path[n] = k; deps[k] = ""
		for (i = 2; i <= NF; i++) deps[k] = deps[k] " " $i
	}
	function visit(k,   a, i, c) {
		if (k in seen) return
		seen[k] = 1
		c = split(deps[k], a, " ")
		for (i = 1; i <= c; i++) visit(a[i])
		print k
	}
	END {
		c = split(want, w, /[ \n]+/)
		for (i = 1; i <= c; i++) {
			if (w[i] in path) visit(path[w[i]])
			else if (!(w[i] in inkernel)) { print "module " w[i] " not found" > "/dev/stderr"; exit 1 }
		}
	}' "$mdir/modules.dep") || die "resolving modules for $krel failed"

rootfs="$tmp/root"
mkdir -p "$rootfs"/{bin,sbin,etc,proc,sys,dev,tmp,run,lib/modules}
cp "$busybox" "$rootfs/bin/busybox"
install -m 0755 "$here/init" "$rootfs/init"
for m in $order; do
	[ -f "$mdir/$m" ] || die "module $m listed in modules.dep but missing (compressed modules are not supported)"
	mkdir -p "$rootfs/lib/modules/$(dirname "$m")"
	cp "$mdir/$m" "$rootfs/lib/modules/$m"
done
printf '%s\n' $order >"$rootfs/etc/modules.load"
# The kernel opens /dev/console for init before devtmpfs is mounted.
if [ "$(id -u)" = 0 ]; then mknod -m 600 "$rootfs/dev/console" c 5 1; fi
(cd "$root" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 GOFLAGS=-mod=mod "$GO" build -trimpath -buildvcs=false \
	-ldflags='-s -w -buildid=' -o "$rootfs/sbin/hostd-agent" ./images/guest/agent) || die "building the guest agent failed"

find "$rootfs" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$rootfs" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) | gzip -n -9 >"$tmp/initrd.img"
cp "$vmlinuz" "$tmp/vmlinuz"

size() { stat -c %s "$1"; }
sha() { sha256sum "$1" | cut -c1-64; }
modjson=$(printf '"%s",' $order)
cat >"$tmp/guest.json" <<JSON
{
  "kernel_release": "$krel",
  "kernel_package": "$kpkg",
  "kernel_package_version": "$kver",
  "busybox_version": "$bbver",
  "go_version": "$("$GO" env GOVERSION)",
  "agent_source_sha256": "$srchash",
  "modules": [${modjson%,}],
  "source_date_epoch": $SOURCE_DATE_EPOCH,
  "vmlinuz_bytes": $(size "$tmp/vmlinuz"),
  "vmlinuz_sha256": "$(sha "$tmp/vmlinuz")",
  "initrd_bytes": $(size "$tmp/initrd.img"),
  "initrd_sha256": "$(sha "$tmp/initrd.img")",
  "agent_bytes": $(size "$rootfs/sbin/hostd-agent"),
  "agent_sha256": "$(sha "$rootfs/sbin/hostd-agent")"
}
JSON
# Replace the outputs, then record the inputs: an interrupted build is never
# mistaken for a cached one.
rm -f "$out/.inputs"
for f in vmlinuz initrd.img guest.json; do mv -f "$tmp/$f" "$out/$f"; done
echo "$inputs" >"$out/.inputs"
echo "guest: built $krel initrd $(size "$out/initrd.img") bytes in $(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo '?') s -> $out"
