package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Linux input event constants (linux/input-event-codes.h).
const (
	evKey    = 0x01
	keyPower = 116
	// An input_event on 64-bit Linux: struct timeval (16 bytes), then
	// type u16, code u16, value s32.
	inputEventSize = 24
)

// watchPowerButton powers the guest off when the ACPI power button is
// pressed. The test guest runs no acpid, and an ACPI shutdown from the
// host (libvirt's virDomainShutdown) is exactly a press of that button:
// without this, hostd's graceful shutdown could only ever time out. It
// must run before the ready line, or a press right after it is lost.
func (a *agent) watchPowerButton() error {
	devs, err := powerButtons()
	if err != nil {
		return err
	}
	for _, dev := range devs {
		f, err := os.Open(dev)
		if err != nil {
			return fmt.Errorf("watch power button: %w", err)
		}
		go a.readPowerButton(f)
	}
	return nil
}

// powerButtons finds the event devices whose name says they are a power
// button (QEMU's machine has the ACPI fixed-feature button, "Power Button").
func powerButtons() ([]string, error) {
	names, err := filepath.Glob("/sys/class/input/event*/device/name")
	if err != nil {
		return nil, fmt.Errorf("find power button: %w", err)
	}
	var devs []string
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil || !strings.Contains(string(b), "Power Button") {
			continue
		}
		devs = append(devs, filepath.Join("/dev/input", filepath.Base(filepath.Dir(filepath.Dir(n)))))
	}
	if len(devs) == 0 {
		return nil, errors.New("find power button: no input device named \"Power Button\" (are button.ko and evdev.ko loaded?)")
	}
	return devs, nil
}

func (a *agent) readPowerButton(f *os.File) {
	defer f.Close()
	ev := make([]byte, inputEventSize)
	for {
		if _, err := io.ReadFull(f, ev); err != nil {
			a.console.print("HOSTD-AGENT ERROR power button: " + err.Error())
			return
		}
		typ := binary.LittleEndian.Uint16(ev[16:18])
		code := binary.LittleEndian.Uint16(ev[18:20])
		value := int32(binary.LittleEndian.Uint32(ev[20:24]))
		if typ == evKey && code == keyPower && value == 1 {
			a.console.printSync("HOSTD-AGENT POWEROFF acpi power button")
			syscall.Sync()
			if err := syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
				a.console.print("HOSTD-AGENT ERROR power off: " + err.Error())
			}
		}
	}
}
