// Package qemu holds typed QEMU monitor (QMP) helpers for the operations
// libvirt does not model, built only on xen.Monitor: migration capabilities,
// and saving or loading a paused guest's device state through a file
// descriptor. hostd's checkpoint and restore code uses them with guest RAM in
// a shared file (see xen/libvirt) and the x-ignore-shared capability, so the
// device state is all that moves: a few hundred KB for a small guest.
//
// The save side: suspend the domain, SetMigrationCapabilities
// {"x-ignore-shared": true}, SaveDeviceState to a file, then destroy (or
// resume: a source that saved its state can continue). The restore side:
// define the domain with Incoming and the same RAM file, start it (it waits
// paused in "inmigrate"), set the same capability, LoadDeviceState, resume.
package qemu
