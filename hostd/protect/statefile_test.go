package protect

import (
	"bytes"
	"errors"
	"testing"

	"hostd/xen"
)

func TestStateRoundTrip(t *testing.T) {
	in := Saved{Name: "vm1", Spec: xen.DomainSpec{Name: "vm1", VCPUs: 1, MemoryMiB: 128, Cmdline: "console=ttyS0"}}
	qemu := []byte("QEVM\x00\x00\x00\x03device-state")
	blob, err := EncodeState(in, qemu)
	if err != nil {
		t.Fatal(err)
	}
	out, q, err := DecodeState(blob)
	if err != nil {
		t.Fatal(err)
	}
	if out.Name != in.Name || out.Spec.MemoryMiB != 128 || out.Spec.Cmdline != in.Spec.Cmdline || !bytes.Equal(q, qemu) {
		t.Fatalf("round trip: %+v %q", out, q)
	}
	for name, b := range map[string][]byte{
		"empty":     nil,
		"magic":     []byte("HOSTDVM2\x00\x00\x00\x02{}x"),
		"too long":  append([]byte(stateMagic), 0xff, 0xff, 0xff, 0xff),
		"no state":  blob[:len(blob)-len(qemu)],
		"bad json":  append([]byte(stateMagic+"\x00\x00\x00\x02{x"), 'q'),
		"no memory": append([]byte(stateMagic+"\x00\x00\x00\x0c{\"name\":\"a\"}"), 'q'),
	} {
		if _, _, err := DecodeState(b); !errors.Is(err, ErrBadState) {
			t.Errorf("%s: want ErrBadState, got %v", name, err)
		}
	}
}

func FuzzDecodeState(f *testing.F) {
	blob, _ := EncodeState(Saved{Name: "a", Spec: xen.DomainSpec{MemoryMiB: 1}}, []byte("s"))
	f.Add(blob)
	f.Add([]byte(stateMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, q, err := DecodeState(b)
		if err == nil && (s.Name == "" || len(q) == 0) {
			t.Fatalf("accepted an incomplete blob: %+v %d", s, len(q))
		}
	})
}
