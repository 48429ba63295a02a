// Package guestimage locates, builds and describes hostd's nested test
// guest: the Debian cloud kernel and the initramfs with the guest agent
// that images/guest/build.sh produces in build/guest. Tests across hostd
// that boot a real VM get their kernel and initrd here (Require), and the
// QEMU arguments for a TCG direct-kernel boot with the agent channel
// (QEMUArgs), so every test boots the guest the same way.
package guestimage
