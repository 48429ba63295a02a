#!/usr/bin/env bash
# check-go.sh: fail with a clear message, before any build, when the Go
# toolchain is missing or older than go.mod's `go` line. A Go of 1.21 or
# later that is older switches itself to the required toolchain through the
# module proxy (GOTOOLCHAIN=auto); this check passes when that works.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PATH="/usr/local/go/bin:$PATH"
GO=${GO:-go}
need=$(awk '$1 == "go" { print $2; exit }' "$root/go.mod")
how="install Go $need or later into /usr/local/go: the linux-amd64 tarball from Go's download page, then
  rm -rf /usr/local/go && tar -C /usr/local -xzf go$need.linux-amd64.tar.gz"
if ! command -v "$GO" >/dev/null 2>&1; then
	printf 'check-go: no Go toolchain found (looked for %s in /usr/local/go/bin and $PATH).\n  hostd needs Go %s (go.mod): %s\n' "$GO" "$need" "$how" >&2
	exit 1
fi
if ! have=$(cd "$root" && "$GO" env GOVERSION 2>&1); then
	printf 'check-go: %s cannot provide Go %s (go.mod) here:\n%s\n  %s\n' "$(command -v "$GO")" "$need" "$have" "$how" >&2
	exit 1
fi
have=${have#go}
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
	printf 'check-go: %s is Go %s; hostd needs Go %s or later (go.mod).\n  %s\n' "$(command -v "$GO")" "$have" "$need" "$how" >&2
	exit 1
fi
# The libvirt driver is cgo: without a C compiler Go quietly builds with
# cgo off and hostd does not link.
for tool in gcc pkg-config; do
	command -v "$tool" >/dev/null 2>&1 || {
		printf 'check-go: %s is missing; hostd links libvirt through cgo: apt-get install gcc pkg-config libvirt-dev (make provision does)\n' "$tool" >&2
		exit 1
	}
done
