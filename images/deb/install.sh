#!/usr/bin/env bash
# install.sh DESTDIR PREFIX BIN GUEST: install hostd's files as
# images/deb/files.list names them, under DESTDIR (empty: /). BIN holds the
# built hostd and hostctl, GUEST the test guest image. `make install` and
# `make deb` (which stages the package tree with PREFIX=/usr) both run it.
set -euo pipefail
die() { echo "install.sh: $*" >&2; exit 1; }
[ $# -eq 4 ] || die "usage: install.sh DESTDIR PREFIX BIN GUEST"
destdir=${1%/} prefix=${2%/} bin=$3 guest=$4
[ -n "$prefix" ] || die "PREFIX is empty (use /usr or /usr/local)"
case "$prefix" in /*) ;; *) die "PREFIX must be absolute, got $prefix" ;; esac
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

while read -r mode src dst flags; do
	case "$mode" in '' | '#'*) continue ;; esac
	case "$src" in
	'$BIN/'*) src="$bin/${src#\$BIN/}" ;;
	'$GUEST/'*) src="$guest/${src#\$GUEST/}" ;;
	*) src="$root/$src" ;;
	esac
	dst=${dst/\$PREFIX/$prefix}
	[ -f "$src" ] || die "$src is missing: run make build and make guest first (it becomes $dst)"
	cp "$src" "$tmp"
	if [[ ",${flags:-}," == *,prefix,* ]] && [ "$prefix" != /usr ]; then
		sed -i -e "s|/usr/bin/hostd|$prefix/bin/hostd|g" -e "s|/usr/lib/hostd/|$prefix/lib/hostd/|g" "$tmp"
	fi
	if [[ ",${flags:-}," == *,conffile,* ]] && [ -e "$destdir$dst" ] && ! cmp -s "$tmp" "$destdir$dst"; then
		# An operator's configuration is never overwritten by a source install.
		echo "install.sh: keeping $destdir$dst; the shipped one is $dst.new" >&2
		dst=$dst.new
	fi
	install -D -m "$mode" "$tmp" "$destdir$dst"
	echo "$dst"
done <"$root/images/deb/files.list"
