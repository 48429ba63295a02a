# hostd: build, test, demo and bench entry points. Every target that needs
# system packages runs images/blanket/provision.sh first, so each works on a
# fresh Debian 12 machine.
SHELL := /bin/bash
# A failing benchmark or test must fail the target even when piped to tee.
.SHELLFLAGS := -o pipefail -c
GO ?= go
BUILD := $(CURDIR)/build
BIN := $(BUILD)/bin
export GOFLAGS := -mod=mod -buildvcs=false
export PATH := /usr/local/go/bin:$(PATH)
# Stamped into hostd and hostctl (-version) and the .deb; from git describe,
# made a valid Debian version (images/deb/version.sh).
ifeq ($(origin VERSION),undefined)
VERSION := $(shell bash images/deb/version.sh)
endif
LDFLAGS := -X main.version=$(VERSION)
# make install: source builds; DESTDIR stages, PREFIX /usr is what the .deb uses.
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all build test demo bench guest lint provision clean go-check deb install test-deb \
	bench-platform bench-checkpoint bench-restore bench-dataplane bench-swap pki

all: build

provision:
	bash images/blanket/provision.sh

# A missing or too old Go (or no C compiler for cgo) is a message, not a build error.
go-check:
	GO=$(GO) bash images/blanket/check-go.sh

build: go-check
	mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ ./hostd/cmd/... ./checkpoint/pki/cmd/mkpki

# The test guest (kernel + initramfs with the guest agent), cached in build/guest.
guest: provision go-check
	bash images/guest/build.sh $(BUILD)/guest

# build/hostd_$(VERSION)_amd64.deb: the files of images/deb/files.list.
deb: provision guest build
	bash images/deb/build.sh $(BUILD) $(VERSION) $(BIN) $(BUILD)/guest

# The same files as the .deb, for source builds (no maintainer scripts: run
# systemd-sysusers, systemd-tmpfiles --create and systemctl daemon-reload after).
install:
	bash images/deb/install.sh "$(DESTDIR)" "$(PREFIX)" $(BIN) $(BUILD)/guest

# The package's own test: builds the .deb (or checks $$HOSTD_DEB), installs it
# into a scratch root and starts the installed hostd against libvirtd.
test-deb: provision guest
	$(GO) test -count=1 -v -timeout 15m ./images/deb/

test: provision guest build lint
	bash .ci/test.sh

demo: provision guest build
	bash hostd/demo/demo.sh

# go vet plus staticcheck, pinned, fetched through the Go module proxy.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
lint: go-check
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

bench: bench-platform bench-checkpoint bench-restore bench-dataplane bench-swap

# Each area's benchmark prints `bench: NAME VALUE UNIT` lines; the full
# output is kept in build/bench-AREA.log.
BENCH := $(GO) test -run '^$$' -bench . -benchtime 1x -count 1 -timeout 60m

bench-platform: provision guest build
	$(BENCH) ./hostd/bench/platform/ | tee $(BUILD)/bench-platform.log | grep '^bench:'

# iperf3 measures throughput, socat is the user-space tunnel compared against.
# The memory plane: FUSE-served RAM, bounded flushing, the backup path.
# Library figures first (checkpoint/bench, the memory server), then real
# guests through hostd against a backup behind a tc-throttled veth.
bench-checkpoint: provision guest
	mkdir -p $(BUILD)
	$(BENCH) -bench 'ServedRAM|FinalFlush|BackupPath|Memserver|Protected|Evacuation|VMsPerBackup' \
		./checkpoint/bench/ ./checkpoint/memserver/ ./hostd/bench/protect/ 2>&1 | tee $(BUILD)/bench-checkpoint.log | grep '^bench:'

# Lazy and full restore: fault service, residency with prefetch.
bench-restore: provision guest
	mkdir -p $(BUILD)
	$(BENCH) -bench Restore ./checkpoint/bench/ ./hostd/bench/restore/ 2>&1 | tee $(BUILD)/bench-restore.log | grep '^bench:'

# Cooperative swap: NBD device over page repositories vs a local swap file
# (library), then a real guest paging to its device through hostd under a
# balloon (overload_workload_ratio).
bench-swap: provision guest
	mkdir -p $(BUILD)
	$(BENCH) ./dataplane/swapdev/ ./hostd/bench/swap/ 2>&1 | tee $(BUILD)/bench-swap.log | grep '^bench:'

# A test CA with a backup-server and a host certificate (mutual TLS between
# hosts and the backup role) in build/pki.
pki:
	$(GO) run ./checkpoint/pki/cmd/mkpki -dir $(BUILD)/pki -server localhost,127.0.0.1 -hosts host1

bench-dataplane: provision
	command -v iperf3 >/dev/null && command -v socat >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iperf3 socat; }
	mkdir -p $(BUILD)
	$(BENCH) ./dataplane/ 2>&1 | tee $(BUILD)/bench-dataplane.log | grep '^bench:'

clean:
	rm -rf $(BUILD)
