// Command mkpki writes a test PKI for the backup path's mutual TLS into a
// directory: a CA, a backup server certificate and host client
// certificates.
//
//	mkpki -dir build/pki -server localhost,127.0.0.1 -hosts host1,host2
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"hostd/checkpoint/pki"
)

func main() {
	dir := flag.String("dir", "", "output directory")
	server := flag.String("server", "localhost,127.0.0.1", "comma-separated backup server names and addresses")
	hosts := flag.String("hosts", "host1", "comma-separated host (client) names")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "mkpki: -dir is required")
		os.Exit(2)
	}
	err := pki.Generate(*dir, pki.Spec{ServerNames: strings.Split(*server, ","), Hosts: strings.Split(*hosts, ",")})
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkpki:", err)
		os.Exit(1)
	}
}
