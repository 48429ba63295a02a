#!/usr/bin/env bash
# The test suite behind `make test`. Packages run one at a time (-p 1): the
# integration tests share the machine's libvirtd (one of them restarts it),
# and TCG guests want both cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export GOFLAGS="${GOFLAGS:--mod=mod -buildvcs=false}"
# go vet and staticcheck ran in `make lint` before this script.
go test -count=1 -p 1 -timeout 75m ./... 2>&1 | tee build/test.log
# The API's fuzz target, for a bounded time: arbitrary bodies and names on
# every route (its seeds already ran above as a plain test).
go test -count=1 -run '^$' -fuzz '^FuzzAPIRequests$' -fuzztime 60s ./hostd/api/ 2>&1 | tee -a build/test.log
