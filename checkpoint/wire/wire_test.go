package wire

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"testing"
)

func page(fill byte, n int) []byte { return bytes.Repeat([]byte{fill}, n*PageSize) }

func sampleMessages() []Message {
	d := page(7, 2)
	s := []byte("device state bytes")
	return []Message{
		&Hello{Version: Version, VMID: "vm-1.a_b", ImageSize: 256 << 20, Epoch: 3},
		&Welcome{Committed: 2, ImageSize: 256 << 20, StateLen: 275000},
		&Fetch{ID: 9, Offset: 4096, Length: 8192},
		&Fetch{ID: 10, Offset: 3, Length: 100, State: true},
		&Pages{ID: 9, Offset: 4096, CRC: Checksum(d), Data: d},
		&Extent{Epoch: 3, Offset: 8192, CRC: Checksum(d), Data: d},
		&StateChunk{Epoch: 3, Offset: 0, CRC: Checksum(s), Data: s},
		&Commit{Epoch: 3, Extents: 1, Bytes: uint64(len(d)), Digest: 42, StateLen: uint64(len(s)), StateCRC: Checksum(s), Restorable: true},
		&Ack{Epoch: 3},
		&Error{Code: CodeEpoch, Message: "resync"},
		&Fetch{ID: 11, Offset: 1 << 20, Length: 1 << 20, Sequential: true},
		&RestoreHello{Version: Version, VMID: "vm-1", Epoch: 0},
		&RestoreHello{Version: Version, VMID: "vm-1", Epoch: 7, Resume: true},
		&RestoreWelcome{Committed: 8, Epoch: 7, ImageSize: 256 << 20, StateLen: 900, StateCRC: 5, Pages: 300, Runs: 2},
		&Runs{Runs: []Run{{First: 0, Count: 100, Epoch: 7}, {First: 4096, Count: 200, Epoch: 0}}},
		restorePages(12, 8192, d, []PageSum{{CRC: Checksum(d[:PageSize]), Epoch: 3}, {CRC: 1, Epoch: 7}}),
		&Ping{ID: 13},
		&Pong{ID: 13},
	}
}

func restorePages(id, off uint64, data []byte, sums []PageSum) *RestorePages {
	return &RestorePages{ID: id, Offset: off, CRC: RestorePagesCRC(sums, data), Sums: sums, Data: data}
}

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	msgs := sampleMessages()
	for _, m := range msgs {
		if err := w.Write(m); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	r := NewReader(&buf)
	for _, want := range msgs {
		got, err := r.Read()
		if err != nil {
			t.Fatalf("read %s: %v", want.Type(), err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("round trip %s: got %+v want %+v", want.Type(), got, want)
		}
	}
	if _, err := r.Read(); err != io.EOF {
		t.Fatalf("after last frame: %v, want io.EOF", err)
	}
}

// Encoding through AppendFrame and through Writer's no-copy path must give
// identical bytes.
func TestWriterMatchesAppendFrame(t *testing.T) {
	for _, m := range sampleMessages() {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		if err := w.Write(m); err != nil {
			t.Fatal(err)
		}
		w.Flush()
		want, err := AppendFrame(nil, m)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf.Bytes(), want) {
			t.Fatalf("%s: writer and AppendFrame differ", m.Type())
		}
	}
}

func TestRejectsMalformed(t *testing.T) {
	d := page(1, 1)
	good, _ := AppendFrame(nil, &Extent{Epoch: 1, Offset: 0, CRC: Checksum(d), Data: d})
	badCRC := bytes.Clone(good)
	badCRC[len(badCRC)-1] ^= 1
	hello, _ := AppendFrame(nil, &Hello{Version: 1, VMID: "vm", ImageSize: 4096, Epoch: 1})
	traversal := bytes.Clone(hello)
	copy(traversal[8:10], "..")
	cases := map[string][]byte{
		"zero length":     {0, 0, 0, 0},
		"oversize":        {0x7f, 0, 0, 0, 3},
		"unknown type":    {0, 0, 0, 1, 99},
		"short ack":       {0, 0, 0, 3, byte(TypeAck), 0, 1},
		"ack epoch 0":     {0, 0, 0, 9, byte(TypeAck), 0, 0, 0, 0, 0, 0, 0, 0},
		"extent crc":      badCRC,
		"vm id traversal": traversal,
		"truncated body":  good[:100],
		"fetch flags":     {0, 0, 0, 22, byte(TypeFetch), 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 4},
		"restore pages crc": func() []byte {
			b, _ := AppendFrame(nil, restorePages(1, 0, d, []PageSum{{CRC: 9, Epoch: 1}}))
			b[len(b)-PageSize-PageSumSize+3] ^= 1 // a stored sum changed in transit
			return b
		}(),
		"restore pages count": func() []byte {
			b, _ := AppendFrame(nil, restorePages(1, 0, d, []PageSum{{CRC: 9, Epoch: 1}}))
			b[5+20+3] = 2 // claims two pages, carries one
			return b
		}(),
		"runs count": {0, 0, 0, 5, byte(TypeRuns), 0, 0, 0, 1},
		"resume epoch 0": func() []byte {
			b, _ := AppendFrame(nil, &RestoreHello{Version: 1, VMID: "vm", Epoch: 1, Resume: true})
			for i := len(b) - 9; i < len(b)-1; i++ {
				b[i] = 0
			}
			return b
		}(),
	}
	for name, b := range cases {
		_, err := NewReader(bytes.NewReader(b)).Read()
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if !errors.Is(err, ErrMalformed) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("%s: error %v wraps neither ErrMalformed nor ErrUnexpectedEOF", name, err)
		}
	}
}

// TestRestorePagesBlame: the frame's own CRC covers the transfer; a page
// whose stored sum disagrees with its data still decodes (the frame is
// intact), and it is the receiver's check against PageSum.CRC that finds
// the backup's copy damaged.
func TestRestorePagesBlame(t *testing.T) {
	d := page(5, 2)
	d[PageSize+9] ^= 0x10 // the backup's image has a flipped bit
	sums := []PageSum{{CRC: Checksum(page(5, 1)), Epoch: 2}, {CRC: Checksum(page(5, 1)), Epoch: 2}}
	b, err := AppendFrame(nil, restorePages(4, 0, d, sums))
	if err != nil {
		t.Fatal(err)
	}
	m, err := Decode(b[4:])
	if err != nil {
		t.Fatalf("intact frame refused: %v", err)
	}
	rp := m.(*RestorePages)
	if Checksum(rp.Data[:PageSize]) != rp.Sums[0].CRC || Checksum(rp.Data[PageSize:]) == rp.Sums[1].CRC {
		t.Fatal("per-page sums do not single out the damaged page")
	}
}

func TestEncodeRejectsInvalid(t *testing.T) {
	bad := []Message{
		&Hello{Version: 1, VMID: "a/b", ImageSize: 4096, Epoch: 1},
		&Hello{Version: 1, VMID: "vm", ImageSize: 100, Epoch: 1},
		&Extent{Epoch: 1, Offset: 100, Data: page(0, 1), CRC: Checksum(page(0, 1))},
		&Extent{Epoch: 1, Offset: 0, Data: make([]byte, MaxData+PageSize)},
		&Fetch{ID: 1, Offset: 0, Length: 10, State: true, Sequential: true},
		&RestoreHello{Version: 1, VMID: "vm", Resume: true},
		&RestoreWelcome{Committed: 1, Epoch: 2, ImageSize: 4096},
		&Runs{},
		&RestorePages{ID: 1, Offset: 0, Sums: []PageSum{{}}, Data: page(0, 2)},
	}
	for _, m := range bad {
		if _, err := AppendFrame(nil, m); !errors.Is(err, ErrMalformed) {
			t.Errorf("%T %+v: encode error %v", m, m, err)
		}
	}
}

// FuzzDecode feeds arbitrary frame bodies to the decoder: it must never
// panic, and whatever it accepts must re-encode to the same bytes.
func FuzzDecode(f *testing.F) {
	for _, m := range sampleMessages() {
		b, _ := AppendFrame(nil, m)
		f.Add(b[4:])
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		m, err := Decode(body)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error not wrapping ErrMalformed: %v", err)
			}
			return
		}
		b, err := AppendFrame(nil, m)
		if err != nil {
			t.Fatalf("decoded message does not encode: %v", err)
		}
		if !bytes.Equal(b[4:], body) {
			t.Fatalf("re-encoding differs")
		}
	})
}

// FuzzReader feeds arbitrary streams to the frame reader.
func FuzzReader(f *testing.F) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, m := range sampleMessages() {
		w.Write(m)
	}
	w.Flush()
	f.Add(buf.Bytes())
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, stream []byte) {
		r := NewReader(bytes.NewReader(stream))
		for i := 0; i < 64; i++ {
			if _, err := r.Read(); err != nil {
				return
			}
		}
	})
}
