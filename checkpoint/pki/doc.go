// Package pki makes and loads the certificates of the backup path's mutual
// TLS 1.3: a CA, a server certificate for each backup server and a client
// certificate for each host. Generate writes a test PKI into a directory
// (cmd/mkpki is the command a make target calls); ServerConfig and
// ClientConfig load certificates from files into tls.Configs that accept
// nothing but TLS 1.3 with a certificate signed by the CA on both sides.
//
// Memory pages are secrets: this is what keeps them authenticated and
// encrypted between hosts. A production deployment brings its own CA and
// uses only the loading half.
package pki
