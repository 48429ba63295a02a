#!/usr/bin/env bash
# version.sh [REPO]: the version stamped into hostd and hostctl and given to
# the .deb, from `git describe --tags --always --dirty`, made a valid Debian
# version (it must start with a digit; only [A-Za-z0-9.+~] are used):
#   v1.2.3                 -> 1.2.3
#   v1.2.3-4-gabc1234      -> 1.2.3+git4.abc1234   (sorts after 1.2.3)
#   abc1234 (no tag)       -> 0.0~git173.abc1234   (173 commits; sorts before any 0.0 release)
#   ...-dirty              -> ...+dirty / ....dirty (uncommitted changes)
# Outside a git checkout (a source tarball) it prints 0.0~unknown, or
# $HOSTD_VERSION when that is set (it always wins).
set -euo pipefail
if [ -n "${HOSTD_VERSION:-}" ]; then
	printf '%s\n' "$HOSTD_VERSION"
	exit 0
fi
repo=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
if ! desc=$(git -C "$repo" describe --tags --always --dirty 2>/dev/null); then
	echo 0.0~unknown
	exit 0
fi
dirty=""
case "$desc" in *-dirty) dirty=1; desc=${desc%-dirty} ;; esac
if [[ "$desc" =~ ^v?([0-9][0-9A-Za-z.+~]*)-([0-9]+)-g([0-9a-f]+)$ ]]; then
	v="${BASH_REMATCH[1]}+git${BASH_REMATCH[2]}.${BASH_REMATCH[3]}"
elif [[ "$desc" =~ ^v?([0-9][0-9A-Za-z.+~]*)$ ]] && git -C "$repo" rev-parse -q --verify "refs/tags/$desc" >/dev/null; then
	v="${BASH_REMATCH[1]}"
else
	# No tag (describe printed the abbreviated hash), or a tag that is not a version.
	count=$(git -C "$repo" rev-list --count HEAD 2>/dev/null || echo 0)
	hash=$(git -C "$repo" rev-parse --short HEAD)
	v="0.0~git${count}.${hash}"
fi
if [ -n "$dirty" ]; then
	case "$v" in *+*) v="$v.dirty" ;; *) v="$v+dirty" ;; esac
fi
# Anything else a tag may hold becomes a dot.
printf '%s\n' "$v" | tr -c 'A-Za-z0-9.+~\n' '.'
