package backupstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// ErrCorrupt is wrapped by errors about on-disk data that fails its
// checksums or structure.
var ErrCorrupt = errors.New("corrupt backup data")

// PageSize is the checksum granularity of the image.
const PageSize = 4096

const manifestMagic = "HDMF"
const manifestVersion = 1

// maxManifestExtents bounds decoding work for a damaged manifest.
const maxManifestExtents = 1 << 26

func crc(b []byte) uint32 { return crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)) }

// ExtentSum is one extent written in an epoch with the CRC-32C of each of
// its pages as written.
type ExtentSum struct {
	Offset   int64
	PageCRCs []uint32
}

// Manifest is the commit record of one epoch.
type Manifest struct {
	Epoch      uint64
	ImageSize  int64
	Restorable bool // memory + StateEpoch's state are a consistent restore point
	// StateEpoch is the epoch whose device-state blob belongs to this
	// restore point (0: none yet). A non-restorable epoch carries the
	// previous one forward.
	StateEpoch uint64
	StateLen   int64
	StateCRC   uint32
	RedoLen    int64  // bytes of redo-<Epoch>
	RedoCRC    uint32 // CRC-32C of the whole redo log
	UnixNano   int64
	Extents    []ExtentSum
}

// Pages is the number of pages written in the epoch.
func (m *Manifest) Pages() int {
	n := 0
	for _, e := range m.Extents {
		n += len(e.PageCRCs)
	}
	return n
}

func (m *Manifest) encode() []byte {
	b := []byte(manifestMagic)
	be := binary.BigEndian
	b = be.AppendUint16(b, manifestVersion)
	b = be.AppendUint64(b, m.Epoch)
	b = be.AppendUint64(b, uint64(m.ImageSize))
	r := byte(0)
	if m.Restorable {
		r = 1
	}
	b = append(b, r)
	b = be.AppendUint64(b, m.StateEpoch)
	b = be.AppendUint64(b, uint64(m.StateLen))
	b = be.AppendUint32(b, m.StateCRC)
	b = be.AppendUint64(b, uint64(m.RedoLen))
	b = be.AppendUint32(b, m.RedoCRC)
	b = be.AppendUint64(b, uint64(m.UnixNano))
	b = be.AppendUint32(b, uint32(len(m.Extents)))
	for _, e := range m.Extents {
		b = be.AppendUint64(b, uint64(e.Offset))
		b = be.AppendUint32(b, uint32(len(e.PageCRCs)))
		for _, c := range e.PageCRCs {
			b = be.AppendUint32(b, c)
		}
	}
	return be.AppendUint32(b, crc(b))
}

const manifestFixed = 4 + 2 + 8 + 8 + 1 + 8 + 8 + 4 + 8 + 4 + 8 + 4

// decodeManifest parses and checks a manifest file's bytes.
func decodeManifest(b []byte) (*Manifest, error) {
	be := binary.BigEndian
	if len(b) < manifestFixed+4 {
		return nil, fmt.Errorf("manifest of %d bytes is too short: %w", len(b), ErrCorrupt)
	}
	body, sum := b[:len(b)-4], be.Uint32(b[len(b)-4:])
	if c := crc(body); c != sum {
		return nil, fmt.Errorf("manifest checksum %08x, content has %08x: %w", sum, c, ErrCorrupt)
	}
	if string(body[:4]) != manifestMagic || be.Uint16(body[4:]) != manifestVersion {
		return nil, fmt.Errorf("manifest magic/version %q/%d: %w", body[:4], be.Uint16(body[4:]), ErrCorrupt)
	}
	p := body[6:]
	m := &Manifest{Epoch: be.Uint64(p), ImageSize: int64(be.Uint64(p[8:]))}
	if p[16] > 1 {
		return nil, fmt.Errorf("manifest restorable flag %d: %w", p[16], ErrCorrupt)
	}
	m.Restorable = p[16] == 1
	p = p[17:]
	m.StateEpoch, m.StateLen, m.StateCRC = be.Uint64(p), int64(be.Uint64(p[8:])), be.Uint32(p[16:])
	m.RedoLen, m.RedoCRC, m.UnixNano = int64(be.Uint64(p[20:])), be.Uint32(p[28:]), int64(be.Uint64(p[32:]))
	n := be.Uint32(p[40:])
	p = p[44:]
	if n > maxManifestExtents {
		return nil, fmt.Errorf("manifest claims %d extents: %w", n, ErrCorrupt)
	}
	if m.ImageSize <= 0 || m.ImageSize%PageSize != 0 || m.StateLen < 0 || m.RedoLen < 0 || m.Epoch == 0 || m.StateEpoch > m.Epoch {
		return nil, fmt.Errorf("manifest epoch %d fields out of range: %w", m.Epoch, ErrCorrupt)
	}
	for i := uint32(0); i < n; i++ {
		if len(p) < 12 {
			return nil, fmt.Errorf("manifest extent %d truncated: %w", i, ErrCorrupt)
		}
		e := ExtentSum{Offset: int64(be.Uint64(p))}
		k := be.Uint32(p[8:])
		p = p[12:]
		if uint64(len(p)) < uint64(k)*4 {
			return nil, fmt.Errorf("manifest extent %d: %d page sums truncated: %w", i, k, ErrCorrupt)
		}
		if e.Offset < 0 || e.Offset%PageSize != 0 || e.Offset+int64(k)*PageSize > m.ImageSize || k == 0 {
			return nil, fmt.Errorf("manifest extent %d at %d of %d pages outside image of %d: %w", i, e.Offset, k, m.ImageSize, ErrCorrupt)
		}
		e.PageCRCs = make([]uint32, k)
		for j := range e.PageCRCs {
			e.PageCRCs[j] = be.Uint32(p[4*j:])
		}
		p = p[4*k:]
		m.Extents = append(m.Extents, e)
	}
	if len(p) != 0 {
		return nil, fmt.Errorf("manifest has %d trailing bytes: %w", len(p), ErrCorrupt)
	}
	return m, nil
}

// Redo log record: a 24-byte header then the data.
//
//	u32 magic | u32 data crc | u64 offset | u32 length | u32 header crc
const (
	redoMagic  = 0x52444f31 // "RDO1"
	redoHeader = 24
)

func appendRedoHeader(b []byte, off int64, n int, dataCRC uint32) []byte {
	be := binary.BigEndian
	start := len(b)
	b = be.AppendUint32(b, redoMagic)
	b = be.AppendUint32(b, dataCRC)
	b = be.AppendUint64(b, uint64(off))
	b = be.AppendUint32(b, uint32(n))
	return be.AppendUint32(b, crc(b[start:]))
}

// parseRedoHeader checks a record header and returns offset, length and
// the data checksum.
func parseRedoHeader(h []byte) (off int64, n int, dataCRC uint32, err error) {
	be := binary.BigEndian
	if be.Uint32(h) != redoMagic || crc(h[:20]) != be.Uint32(h[20:]) {
		return 0, 0, 0, fmt.Errorf("redo record header damaged: %w", ErrCorrupt)
	}
	return int64(be.Uint64(h[8:])), int(be.Uint32(h[16:])), be.Uint32(h[4:]), nil
}
