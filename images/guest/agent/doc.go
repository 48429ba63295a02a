// Command agent is the guest agent of hostd's nested test guest. It runs
// inside every test VM (started by the initramfs's /init, see
// images/guest/init), configures the guest from hostd.* kernel options,
// prints a readiness line on the serial console so a host can measure
// create-to-ready, and then serves the agentapi protocol on the
// virtio-serial port org.hostd.agent.0: memory-dirtying workloads whose
// contents a host can verify, operation counters that survive a checkpoint
// and restore of the VM, an echo server for network tests, and memory and
// uptime reports.
//
// It is built static (CGO_ENABLED=0) by images/guest/build.sh and has no
// dependency on anything in the guest but the kernel: no udev, no mdev, no
// libc. The protocol itself is defined in images/guest/agentapi.
package main
