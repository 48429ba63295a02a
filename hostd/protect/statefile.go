package protect

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"

	"hostd/hostd/errdefs"
	"hostd/xen"
)

// A restore point's device-state blob carries, besides QEMU's migration
// stream, the domain's specification: a host restoring the VM needs both
// and the backup keeps one blob per restore point. Layout:
//
//	"HOSTDVM1" | uint32 big-endian n | n bytes of JSON Saved | QEMU stream
const stateMagic = "HOSTDVM1"

// maxSpecJSON bounds the header a restoring host will parse.
const maxSpecJSON = 1 << 20

// ErrBadState: the blob is not one hostd wrote.
var ErrBadState = errdefs.New(errdefs.ErrPeer, "bad_restore_point", "not a hostd restore point")

// Saved is what a restore point records about the VM besides its memory.
type Saved struct {
	Name string         `json:"name"`
	Spec xen.DomainSpec `json:"spec"`
}

// EncodeState frames QEMU's device state with the VM's description.
func EncodeState(s Saved, qemu []byte) ([]byte, error) {
	j, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("encode restore point of %s: %w", s.Name, err)
	}
	if len(j) > maxSpecJSON {
		return nil, fmt.Errorf("encode restore point of %s: description of %d bytes is too large", s.Name, len(j))
	}
	var b bytes.Buffer
	b.Grow(len(stateMagic) + 4 + len(j) + len(qemu))
	b.WriteString(stateMagic)
	_ = binary.Write(&b, binary.BigEndian, uint32(len(j)))
	b.Write(j)
	b.Write(qemu)
	return b.Bytes(), nil
}

// DecodeState splits a blob from a backup into the description and QEMU's
// stream (which aliases blob). The blob comes from the network: every
// length is checked.
func DecodeState(blob []byte) (Saved, []byte, error) {
	var s Saved
	if len(blob) < len(stateMagic)+4 || string(blob[:len(stateMagic)]) != stateMagic {
		return s, nil, fmt.Errorf("decode restore point: %w (bad magic)", ErrBadState)
	}
	n := binary.BigEndian.Uint32(blob[len(stateMagic):])
	rest := blob[len(stateMagic)+4:]
	if n > maxSpecJSON || uint64(n) > uint64(len(rest)) {
		return s, nil, fmt.Errorf("decode restore point: %w (description length %d of %d bytes)", ErrBadState, n, len(rest))
	}
	dec := json.NewDecoder(bytes.NewReader(rest[:n]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return s, nil, fmt.Errorf("decode restore point: %w: %v", ErrBadState, err)
	}
	if s.Name == "" || s.Spec.MemoryMiB == 0 {
		return s, nil, fmt.Errorf("decode restore point: %w (no name or memory size)", ErrBadState)
	}
	if len(rest[n:]) == 0 {
		return s, nil, fmt.Errorf("decode restore point of %s: %w (no device state)", s.Name, ErrBadState)
	}
	return s, rest[n:], nil
}
