#!/usr/bin/env bash
# build.sh OUTDIR VERSION BIN GUEST: build OUTDIR/hostd_VERSION_amd64.deb with
# dpkg-deb from the built binaries in BIN, the test guest in GUEST and the
# files images/deb/files.list names (staged by install.sh with PREFIX=/usr),
# plus the maintainer scripts beside this file. Needs no network.
set -euo pipefail
die() { echo "build.sh: $*" >&2; exit 1; }
[ $# -eq 4 ] || die "usage: build.sh OUTDIR VERSION BIN GUEST"
out=$1 version=$2 bin=$3 guest=$4
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dpkg --validate-version "$version" 2>/dev/null || die "version $version is not a valid Debian version (see images/deb/version.sh)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: apt-get install dpkg"
arch=$(dpkg --print-architecture)
[ "$arch" = amd64 ] || die "this package is built for amd64, not $arch"

stage=$(mktemp -d)
chmod 0755 "$stage" # the package's ./ (mktemp makes it 0700)
trap 'rm -rf "$stage"' EXIT
bash "$here/install.sh" "$stage" /usr "$bin" "$guest" >/dev/null
# As Debian's packages are: binaries without their symbol tables (stack
# traces keep their function names and lines: Go's pclntab stays).
if command -v strip >/dev/null; then
	strip --strip-unneeded "$stage/usr/bin/hostd" "$stage/usr/bin/hostctl"
fi
# A native package's changelog: this build's one entry. The changelog is
# the package's, not an installed file of files.list.
root=$(cd "$here/../.." && pwd)
maintainer="hostd developers <hostd@localhost>"
commit=$(git -C "$root" log -1 --format='%H' 2>/dev/null || echo unknown)
date=$(git -C "$root" log -1 --format='%aD' 2>/dev/null || date -R)
printf 'hostd (%s) unstable; urgency=medium\n\n  * Built from commit %s.\n\n -- %s  %s\n' \
	"$version" "$commit" "$maintainer" "$date" | gzip -9n >"$stage/usr/share/doc/hostd/changelog.gz"

# hostd links libvirt (cgo) and glibc: depend on at least the versions it
# was built against.
upstream() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null | sed -e 's/^[0-9]*://' -e 's/-[^-]*$//'; }
libvirt=$(upstream libvirt0) libc=$(upstream libc6)
[ -n "$libvirt" ] || die "libvirt0 is not installed, so hostd cannot have been linked against it: make provision"
depends="libc6 (>= $libc), libvirt0 (>= $libvirt), libvirt-daemon-system, qemu-system-x86, fuse3"

mkdir -p "$stage/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "$here/$s" "$stage/DEBIAN/$s"; done
awk '!/^#/ && NF >= 4 && ("," $4 ",") ~ /,conffile,/ { print $3 }' "$here/files.list" >"$stage/DEBIAN/conffiles"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: hostd
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $depends
Section: admin
Priority: optional
Homepage: https://github.com/hostd/hostd
Description: host agent of a blanket (nested) hypervisor
 hostd runs in a blanket's control domain and owns the nested VMs of its
 host through libvirt: it creates, boots, watches and adopts them, keeps
 protected VMs' memory checkpointed to a backup server so that each can be
 evacuated within its bound, restores them lazily on any host, and serves a
 scheduler on a unix socket (/run/hostd/hostd.sock). hostctl is its CLI.
 .
 The package holds hostd, hostctl, the systemd units (hostd.service,
 hostd-memserver@.service), sysusers and tmpfiles snippets, the default
 /etc/hostd/hostd.toml and the test guest image in /usr/lib/hostd/guest.
 It does not change libvirt's configuration.
CONTROL
mkdir -p "$out"
deb="$out/hostd_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
