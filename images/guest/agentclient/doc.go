// Package agentclient is hostd's host-side client for the guest agent of
// the nested test guest (images/guest/agent). hostd's tests, benchmarks and
// demos use it to tell a guest what to do (dirty memory at a rate, serve
// echo traffic) and to check what it did (region checksums against
// ExpectedChecksum, operation counters that must keep growing across a
// checkpoint and restore).
//
// The transport is the unix socket QEMU listens on for the VM's
// virtio-serial port org.hostd.agent.0 (Dial); readiness is read from the
// VM's serial log (WaitReady). The wire protocol is defined in
// images/guest/agentapi.
package agentclient
