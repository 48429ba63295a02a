# hostd: build, test, demo and bench entry points. Every target that needs
# system packages runs images/blanket/provision.sh first, so each works on a
# fresh Debian 12 machine.
SHELL := /bin/bash
GO ?= go
BUILD := $(CURDIR)/build
BIN := $(BUILD)/bin
export GOFLAGS := -mod=mod -buildvcs=false
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all build test demo bench guest lint provision clean \
	bench-platform bench-checkpoint bench-restore bench-dataplane bench-swap

all: build

provision:
	bash images/blanket/provision.sh

build:
	mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./hostd/cmd/...

# The test guest (kernel + initramfs with the guest agent), cached in build/guest.
guest: provision
	bash images/guest/build.sh $(BUILD)/guest

test: provision guest build
	bash .ci/test.sh

demo: provision guest build
	bash hostd/demo/demo.sh

lint:
	$(GO) vet ./...

bench: bench-platform bench-dataplane

bench-platform: provision guest build
	$(GO) test -run '^$$' -bench . -benchtime 1x -count 1 ./hostd/bench/platform/ | tee -a $(BUILD)/bench.log | grep '^bench:' || true

bench-dataplane: provision
	@echo "bench-dataplane: see dataplane/"

clean:
	rm -rf $(BUILD)
