package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"hostd/images/guest/agentapi"
)

// findDisk returns the block device whose virtio serial is serial: a
// hot-plugged disk's name (vdb, vdc, ...) depends on probe order, its
// serial is what the host chose.
func findDisk(serial string) (dev string, sizeKiB uint64, err error) {
	paths, _ := filepath.Glob("/sys/block/*/serial")
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil || strings.TrimSpace(string(b)) != serial {
			continue
		}
		dir := filepath.Dir(p)
		var sectors uint64
		if b, err := os.ReadFile(filepath.Join(dir, "size")); err == nil {
			sectors, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		}
		return "/dev/" + filepath.Base(dir), sectors / 2, nil
	}
	return "", 0, fmt.Errorf("no block device with serial %q (is the disk attached and its PCI hotplug seen by the guest?)", serial)
}

// swapOn formats the disk as swap and turns it on, with busybox's mkswap
// and swapon. Turning on a disk that is already on is an error (swapon's).
func swapOn(serial string) (agentapi.SwapResult, error) {
	dev, kib, err := findDisk(serial)
	if err != nil {
		return agentapi.SwapResult{}, fmt.Errorf("swapon: %w", err)
	}
	for _, c := range [][]string{{"mkswap", dev}, {"swapon", dev}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			return agentapi.SwapResult{}, fmt.Errorf("swapon: %s: %v: %s", strings.Join(c, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return swapResult(dev, kib)
}

// swapOff turns the disk's swap off (its pages come back into RAM first,
// which needs room for them).
func swapOff(serial string) (agentapi.SwapResult, error) {
	dev, kib, err := findDisk(serial)
	if err != nil {
		return agentapi.SwapResult{}, fmt.Errorf("swapoff: %w", err)
	}
	if out, err := exec.Command("swapoff", dev).CombinedOutput(); err != nil {
		return agentapi.SwapResult{}, fmt.Errorf("swapoff: %s: %v: %s", dev, err, strings.TrimSpace(string(out)))
	}
	return swapResult(dev, kib)
}

func swapResult(dev string, kib uint64) (agentapi.SwapResult, error) {
	mi, err := readMemInfo()
	if err != nil {
		return agentapi.SwapResult{}, err
	}
	return agentapi.SwapResult{Device: dev, SizeKiB: kib, SwapTotalKiB: mi["SwapTotal"]}, nil
}
