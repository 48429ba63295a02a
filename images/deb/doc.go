// Package deb holds hostd's Debian package: the one list of installed files
// (files.list), the script that installs them for `make install` and stages
// them for the package (install.sh), the package build (build.sh, `make
// deb`), its maintainer scripts, the version stamp (version.sh) and the
// bash completion of hostctl. There is no Go code here besides the test,
// which builds the .deb (or takes $HOSTD_DEB), checks its control fields
// and every listed file, installs it into a scratch root with dpkg --root,
// runs the installed binaries, starts the installed hostd with the shipped
// configuration against the machine's libvirtd, boots a VM of the packaged
// guest with the installed hostctl, and purges it again; and checks that
// stock Debian libvirt needs exactly the qemu.conf lines the package ships
// (libvirt-qemu.conf), each case against a libvirtd of its own.
package deb
