package bpf

// Regenerate with Debian's clang (apt-get install clang llvm libbpf-dev);
// the generated Go and .o files are committed so `go build` needs neither.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" Connector connector.c
