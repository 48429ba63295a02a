package wire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Version is the protocol version a Hello carries. A server refuses others.
const Version = 1

// PageSize is the granularity of extents: offsets and lengths of page data
// are multiples of it, so the store can checksum whole pages.
const PageSize = 4096

// MaxData is the largest data payload of one Extent or StateChunk. It is a
// multiple of PageSize and at least FUSE's largest write (1 MiB).
const MaxData = 4 << 20

// MaxFrame is the largest frame body (type byte + payload) accepted: a
// RestorePages frame of MaxData bytes with its per-page sums is the largest.
const MaxFrame = MaxData + MaxData/PageSize*PageSumSize + 64

// MaxVMID is the longest VM id.
const MaxVMID = 64

// ErrMalformed is wrapped by every decoding error caused by the peer's bytes.
var ErrMalformed = errors.New("malformed frame")

// Checksum is the CRC-32C of b: the checksum of every frame and of the
// store (hardware accelerated on x86 and arm64; MakeTable returns the
// standard library's one shared Castagnoli table).
func Checksum(b []byte) uint32 { return crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)) }

// UpdateChecksum extends a CRC-32C with b.
func UpdateChecksum(crc uint32, b []byte) uint32 {
	return crc32.Update(crc, crc32.MakeTable(crc32.Castagnoli), b)
}

// Type is a frame's type byte.
type Type uint8

const (
	TypeHello      Type = 1
	TypeWelcome    Type = 2
	TypeExtent     Type = 3
	TypeStateChunk Type = 4
	TypeCommit     Type = 5
	TypeAck        Type = 6
	TypeError      Type = 7
	TypeFetch      Type = 8
	TypePages      Type = 9
	// Restore sessions (read-only; see RestoreHello).
	TypeRestoreHello   Type = 10
	TypeRestoreWelcome Type = 11
	TypeRuns           Type = 12
	TypeRestorePages   Type = 13
	TypePing           Type = 14
	TypePong           Type = 15
)

func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeWelcome:
		return "welcome"
	case TypeExtent:
		return "extent"
	case TypeStateChunk:
		return "state-chunk"
	case TypeCommit:
		return "commit"
	case TypeAck:
		return "ack"
	case TypeError:
		return "error"
	case TypeFetch:
		return "fetch"
	case TypePages:
		return "pages"
	case TypeRestoreHello:
		return "restore-hello"
	case TypeRestoreWelcome:
		return "restore-welcome"
	case TypeRuns:
		return "runs"
	case TypeRestorePages:
		return "restore-pages"
	case TypePing:
		return "ping"
	case TypePong:
		return "pong"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Message is one decoded frame.
type Message interface {
	Type() Type
	// appendPayload appends the encoded payload (without header).
	appendPayload(b []byte) []byte
}

// Hello opens a session for one VM. Epoch is the epoch the client is about
// to send (its last acknowledged commit + 1, or 1 for a new VM).
type Hello struct {
	Version   uint16
	VMID      string
	ImageSize uint64 // guest RAM size in bytes, a multiple of PageSize
	Epoch     uint64
}

// Welcome answers Hello: the backup's last committed epoch for the VM (0 if
// none) and the image size it holds (0 if new). A client whose Hello.Epoch
// is not Committed+1 must resync (see backupclient).
type Welcome struct {
	Committed uint64
	ImageSize uint64
	// StateLen is the length of the device-state blob of the backup's
	// restore point (0: none), for a restoring host's Fetch.
	StateLen uint64
}

// Fetch asks for committed data (lazy restore): image pages at Offset
// (page aligned, Length a multiple of PageSize), or with State set, bytes
// of the restore point's device-state blob. The answer is a Pages frame
// with the same ID (in a restore session, a RestorePages frame for image
// pages); answers come in request order.
type Fetch struct {
	ID     uint64
	Offset uint64
	Length uint32
	State  bool
	// Sequential marks a range read as part of a sweep (full restore or
	// prefetch) rather than a guest's fault: the backup reads it with
	// sequential read-ahead instead of random-access hints.
	Sequential bool
}

// Pages answers a Fetch. Data aliases the decoder's buffer until the next
// Read.
type Pages struct {
	ID     uint64
	Offset uint64
	CRC    uint32
	Data   []byte
}

// Extent is guest memory at a guest-physical offset. Data aliases the
// decoder's buffer and is valid until the next Read.
type Extent struct {
	Epoch  uint64
	Offset uint64
	CRC    uint32 // CRC-32C of Data
	Data   []byte
}

// StateChunk is part of the device-state blob of an epoch, at Offset within
// the blob. Chunks arrive in order.
type StateChunk struct {
	Epoch  uint64
	Offset uint64
	CRC    uint32
	Data   []byte
}

// Commit closes an epoch. The counts and digests let the server check that
// it stored exactly what the client sent before it makes the epoch durable.
type Commit struct {
	Epoch   uint64
	Extents uint64 // number of Extent frames in the epoch
	Bytes   uint64 // total extent data bytes
	// Digest is the CRC-32C over the big-endian CRCs of the epoch's
	// extents, in send order.
	Digest     uint32
	StateLen   uint64 // device-state blob length, 0 for none
	StateCRC   uint32 // CRC-32C of the whole blob
	Restorable bool   // the VM was paused: memory + state form a restore point
}

// Ack confirms that an epoch is durable on the backup.
type Ack struct {
	Epoch uint64
}

// Error reports why the peer ends the session.
type Error struct {
	Code    ErrorCode
	Message string
}

// ErrorCode classifies an Error frame.
type ErrorCode uint16

const (
	CodeInternal  ErrorCode = 1 // server-side failure (disk, ...)
	CodeMalformed ErrorCode = 2 // the peer sent a bad frame
	CodeProtocol  ErrorCode = 3 // well-formed frame at the wrong time
	CodeEpoch     ErrorCode = 4 // epoch mismatch: resync
	CodeMismatch  ErrorCode = 5 // commit counts or checksums disagree
	CodeNoSpace   ErrorCode = 6 // backup disk full
	CodeBusy      ErrorCode = 7
	CodeNotFound  ErrorCode = 8 // no such VM or restore point at the backup
)

// RestoreHello opens a read-only restore session for one VM: the backup
// serves the pages and device state of a restore point and never begins an
// epoch or takes over the VM's writer session. The answer is a
// RestoreWelcome followed by Runs frames listing the restore point's
// non-zero pages (none when Resume is set), then Fetch and Ping frames are
// answered in order.
type RestoreHello struct {
	Version uint16
	VMID    string
	// Epoch is the restore point wanted; 0 means the backup's latest.
	Epoch uint64
	// Resume reconnects a restore already in progress (Epoch set): the
	// client holds the map and the device state and wants pages only.
	Resume bool
}

// RestoreWelcome answers RestoreHello.
type RestoreWelcome struct {
	Committed uint64 // the backup's last committed epoch
	Epoch     uint64 // the restore point served
	ImageSize uint64
	StateLen  uint64 // device-state blob of the restore point (0 on resume)
	StateCRC  uint32
	Pages     uint64 // non-zero pages of the image (0 on resume)
	Runs      uint64 // Run entries sent next in Runs frames (0 on resume)
}

// Run is a range of non-zero pages [First, First+Count) of a restore
// point's image, all last written in Epoch (0: unknown, written before the
// backup recorded epochs). Pages outside every run are zero and never
// cross the wire.
type Run struct {
	First uint64
	Count uint32
	Epoch uint64
}

// RunSize is the encoded size of a Run.
const RunSize = 20

// Runs carries part of a restore point's page map, in ascending order.
type Runs struct {
	Runs []Run
}

// PageSum is what the backup's store holds about one page it serves: the
// CRC-32C the page had when the host sent it, and the epoch that wrote it.
// A client checks each page against CRC: a mismatch means the backup's
// stored copy is damaged (CRC of the whole frame having verified the
// transfer).
type PageSum struct {
	CRC   uint32
	Epoch uint64
}

// PageSumSize is the encoded size of a PageSum.
const PageSumSize = 12

// RestorePages answers a page Fetch in a restore session: the data as
// read from the backup's image, the stored sums of each page, and CRC over
// the encoded sums and the data (the transfer's own check). Data aliases
// the decoder's buffer until the next Read.
type RestorePages struct {
	ID     uint64
	Offset uint64
	CRC    uint32
	Sums   []PageSum
	Data   []byte
}

// Ping asks for a Pong with the same ID, in order with other answers: a
// round trip through the backup's session without touching its disk.
type Ping struct {
	ID uint64
}

// Pong answers Ping.
type Pong struct {
	ID uint64
}

func (e *Error) Error() string { return fmt.Sprintf("peer error %d: %s", e.Code, e.Message) }

func (*Hello) Type() Type      { return TypeHello }
func (*Welcome) Type() Type    { return TypeWelcome }
func (*Extent) Type() Type     { return TypeExtent }
func (*StateChunk) Type() Type { return TypeStateChunk }
func (*Commit) Type() Type     { return TypeCommit }
func (*Ack) Type() Type        { return TypeAck }
func (*Error) Type() Type      { return TypeError }
func (*Fetch) Type() Type      { return TypeFetch }
func (*Pages) Type() Type      { return TypePages }

func (*RestoreHello) Type() Type   { return TypeRestoreHello }
func (*RestoreWelcome) Type() Type { return TypeRestoreWelcome }
func (*Runs) Type() Type           { return TypeRuns }
func (*RestorePages) Type() Type   { return TypeRestorePages }
func (*Ping) Type() Type           { return TypePing }
func (*Pong) Type() Type           { return TypePong }

var be = binary.BigEndian

func (m *Hello) appendPayload(b []byte) []byte {
	b = be.AppendUint16(b, m.Version)
	b = append(b, byte(len(m.VMID)))
	b = append(b, m.VMID...)
	b = be.AppendUint64(b, m.ImageSize)
	return be.AppendUint64(b, m.Epoch)
}

func (m *Welcome) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.Committed)
	b = be.AppendUint64(b, m.ImageSize)
	return be.AppendUint64(b, m.StateLen)
}

func (m *Fetch) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	b = be.AppendUint64(b, m.Offset)
	b = be.AppendUint32(b, m.Length)
	var fl byte
	if m.State {
		fl |= fetchState
	}
	if m.Sequential {
		fl |= fetchSequential
	}
	return append(b, fl)
}

// Fetch flag bits.
const (
	fetchState      = 1
	fetchSequential = 2
)

func (m *RestoreHello) appendPayload(b []byte) []byte {
	b = be.AppendUint16(b, m.Version)
	b = append(b, byte(len(m.VMID)))
	b = append(b, m.VMID...)
	b = be.AppendUint64(b, m.Epoch)
	var r byte
	if m.Resume {
		r = 1
	}
	return append(b, r)
}

func (m *RestoreWelcome) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.Committed)
	b = be.AppendUint64(b, m.Epoch)
	b = be.AppendUint64(b, m.ImageSize)
	b = be.AppendUint64(b, m.StateLen)
	b = be.AppendUint32(b, m.StateCRC)
	b = be.AppendUint64(b, m.Pages)
	return be.AppendUint64(b, m.Runs)
}

func (m *Runs) appendPayload(b []byte) []byte {
	b = be.AppendUint32(b, uint32(len(m.Runs)))
	for _, r := range m.Runs {
		b = be.AppendUint64(b, r.First)
		b = be.AppendUint32(b, r.Count)
		b = be.AppendUint64(b, r.Epoch)
	}
	return b
}

// AppendPageSums appends the encoding of sums (as in a RestorePages frame).
func AppendPageSums(b []byte, sums []PageSum) []byte {
	for _, s := range sums {
		b = be.AppendUint32(b, s.CRC)
		b = be.AppendUint64(b, s.Epoch)
	}
	return b
}

// RestorePagesCRC is the CRC a RestorePages frame carries: over the
// encoded sums, then the data.
func RestorePagesCRC(sums []PageSum, data []byte) uint32 {
	var tmp [64 * PageSumSize]byte
	var c uint32
	for len(sums) > 0 {
		n := min(len(sums), 64)
		c = UpdateChecksum(c, AppendPageSums(tmp[:0], sums[:n]))
		sums = sums[n:]
	}
	return UpdateChecksum(c, data)
}

func (m *RestorePages) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	b = be.AppendUint64(b, m.Offset)
	b = be.AppendUint32(b, m.CRC)
	b = be.AppendUint32(b, uint32(len(m.Sums)))
	b = AppendPageSums(b, m.Sums)
	return append(b, m.Data...)
}

func (m *Ping) appendPayload(b []byte) []byte { return be.AppendUint64(b, m.ID) }
func (m *Pong) appendPayload(b []byte) []byte { return be.AppendUint64(b, m.ID) }

func (m *Pages) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	b = be.AppendUint64(b, m.Offset)
	b = be.AppendUint32(b, m.CRC)
	return append(b, m.Data...)
}

func (m *Extent) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.Epoch)
	b = be.AppendUint64(b, m.Offset)
	b = be.AppendUint32(b, m.CRC)
	return append(b, m.Data...)
}

func (m *StateChunk) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.Epoch)
	b = be.AppendUint64(b, m.Offset)
	b = be.AppendUint32(b, m.CRC)
	return append(b, m.Data...)
}

func (m *Commit) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.Epoch)
	b = be.AppendUint64(b, m.Extents)
	b = be.AppendUint64(b, m.Bytes)
	b = be.AppendUint32(b, m.Digest)
	b = be.AppendUint64(b, m.StateLen)
	b = be.AppendUint32(b, m.StateCRC)
	var r byte
	if m.Restorable {
		r = 1
	}
	return append(b, r)
}

func (m *Ack) appendPayload(b []byte) []byte { return be.AppendUint64(b, m.Epoch) }

func (m *Error) appendPayload(b []byte) []byte {
	msg := m.Message
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	b = be.AppendUint16(b, uint16(m.Code))
	b = be.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

// ValidVMID reports whether id is a usable VM id: 1..MaxVMID characters of
// [A-Za-z0-9._-], not starting with a dot. The id becomes a directory
// name on the backup, so this is also path-traversal protection.
func ValidVMID(id string) error {
	if len(id) == 0 || len(id) > MaxVMID {
		return fmt.Errorf("vm id length %d not in 1..%d: %w", len(id), MaxVMID, ErrMalformed)
	}
	if id[0] == '.' {
		return fmt.Errorf("vm id %q starts with a dot: %w", id, ErrMalformed)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return fmt.Errorf("vm id has byte 0x%02x at %d: %w", c, i, ErrMalformed)
		}
	}
	return nil
}

// Validate checks a message's fields independent of session state, on both
// the encoding and the decoding side.
func Validate(m Message) error {
	switch m := m.(type) {
	case *Hello:
		if err := ValidVMID(m.VMID); err != nil {
			return err
		}
		if m.ImageSize == 0 || m.ImageSize%PageSize != 0 {
			return fmt.Errorf("hello image size %d not a positive multiple of %d: %w", m.ImageSize, PageSize, ErrMalformed)
		}
		if m.Epoch == 0 {
			return fmt.Errorf("hello epoch 0: %w", ErrMalformed)
		}
	case *Welcome:
		if m.ImageSize%PageSize != 0 {
			return fmt.Errorf("welcome image size %d not a multiple of %d: %w", m.ImageSize, PageSize, ErrMalformed)
		}
		if m.StateLen > 1<<40 {
			return fmt.Errorf("welcome state length %d out of range: %w", m.StateLen, ErrMalformed)
		}
	case *Fetch:
		if m.Length == 0 || m.Length > MaxData || m.Offset > 1<<62 {
			return fmt.Errorf("fetch %d bytes at %d out of range: %w", m.Length, m.Offset, ErrMalformed)
		}
		if !m.State && (m.Offset%PageSize != 0 || m.Length%PageSize != 0) {
			return fmt.Errorf("fetch %d bytes at %d not page aligned: %w", m.Length, m.Offset, ErrMalformed)
		}
		if m.State && m.Sequential {
			return fmt.Errorf("fetch of device state marked sequential: %w", ErrMalformed)
		}
	case *RestoreHello:
		if err := ValidVMID(m.VMID); err != nil {
			return err
		}
		if m.Resume && m.Epoch == 0 {
			return fmt.Errorf("restore hello resumes epoch 0: %w", ErrMalformed)
		}
	case *RestoreWelcome:
		if m.ImageSize == 0 || m.ImageSize%PageSize != 0 || m.ImageSize > 1<<50 {
			return fmt.Errorf("restore welcome image size %d not a positive multiple of %d: %w", m.ImageSize, PageSize, ErrMalformed)
		}
		if m.Epoch == 0 || m.Committed < m.Epoch {
			return fmt.Errorf("restore welcome epoch %d, committed %d: %w", m.Epoch, m.Committed, ErrMalformed)
		}
		if m.StateLen > 1<<40 || m.Pages > m.ImageSize/PageSize || m.Runs > m.Pages {
			return fmt.Errorf("restore welcome state %d, %d pages in %d runs out of range: %w", m.StateLen, m.Pages, m.Runs, ErrMalformed)
		}
	case *Runs:
		if len(m.Runs) == 0 || len(m.Runs) > MaxData/RunSize {
			return fmt.Errorf("runs frame with %d runs: %w", len(m.Runs), ErrMalformed)
		}
		for i, r := range m.Runs {
			if r.Count == 0 || r.First > 1<<50 {
				return fmt.Errorf("run %d: %d pages at page %d out of range: %w", i, r.Count, r.First, ErrMalformed)
			}
		}
	case *RestorePages:
		n := len(m.Sums)
		if n == 0 || len(m.Data) != n*PageSize || len(m.Data) > MaxData || m.Offset%PageSize != 0 || m.Offset > 1<<62 {
			return fmt.Errorf("restore pages: %d sums, %d bytes at %d: %w", n, len(m.Data), m.Offset, ErrMalformed)
		}
		if c := RestorePagesCRC(m.Sums, m.Data); c != m.CRC {
			return fmt.Errorf("restore pages at %d: crc %08x, content has %08x: %w", m.Offset, m.CRC, c, ErrMalformed)
		}
	case *Ping, *Pong:
	case *Pages:
		if len(m.Data) == 0 || len(m.Data) > MaxData || m.Offset > 1<<62 {
			return fmt.Errorf("pages %d bytes at %d out of range: %w", len(m.Data), m.Offset, ErrMalformed)
		}
		if c := Checksum(m.Data); c != m.CRC {
			return fmt.Errorf("pages at %d: crc %08x, data has %08x: %w", m.Offset, m.CRC, c, ErrMalformed)
		}
	case *Extent:
		if m.Epoch == 0 {
			return fmt.Errorf("extent epoch 0: %w", ErrMalformed)
		}
		if m.Offset%PageSize != 0 || len(m.Data) == 0 || len(m.Data)%PageSize != 0 || len(m.Data) > MaxData {
			return fmt.Errorf("extent at %d length %d not page aligned or out of 1..%d: %w", m.Offset, len(m.Data), MaxData, ErrMalformed)
		}
		if m.Offset > 1<<62 {
			return fmt.Errorf("extent offset %d out of range: %w", m.Offset, ErrMalformed)
		}
		if c := Checksum(m.Data); c != m.CRC {
			return fmt.Errorf("extent at %d: crc %08x, data has %08x: %w", m.Offset, m.CRC, c, ErrMalformed)
		}
	case *StateChunk:
		if m.Epoch == 0 {
			return fmt.Errorf("state chunk epoch 0: %w", ErrMalformed)
		}
		if len(m.Data) == 0 || len(m.Data) > MaxData || m.Offset > 1<<40 {
			return fmt.Errorf("state chunk at %d length %d out of range: %w", m.Offset, len(m.Data), ErrMalformed)
		}
		if c := Checksum(m.Data); c != m.CRC {
			return fmt.Errorf("state chunk at %d: crc %08x, data has %08x: %w", m.Offset, m.CRC, c, ErrMalformed)
		}
	case *Commit:
		if m.Epoch == 0 {
			return fmt.Errorf("commit epoch 0: %w", ErrMalformed)
		}
		if m.StateLen > 1<<40 {
			return fmt.Errorf("commit state length %d out of range: %w", m.StateLen, ErrMalformed)
		}
	case *Ack:
		if m.Epoch == 0 {
			return fmt.Errorf("ack epoch 0: %w", ErrMalformed)
		}
	case *Error:
		if len(m.Message) > 1024 {
			return fmt.Errorf("error message of %d bytes: %w", len(m.Message), ErrMalformed)
		}
	default:
		return fmt.Errorf("unknown message %T: %w", m, ErrMalformed)
	}
	return nil
}

// AppendFrame appends m as a complete frame to b. It validates m first, so
// a bug on the sending side is caught here rather than by the peer.
func AppendFrame(b []byte, m Message) ([]byte, error) {
	if err := Validate(m); err != nil {
		return b, fmt.Errorf("encode %s: %w", m.Type(), err)
	}
	start := len(b)
	b = append(b, 0, 0, 0, 0, byte(m.Type()))
	b = m.appendPayload(b)
	n := len(b) - start - 4
	if n > MaxFrame {
		return b[:start], fmt.Errorf("encode %s: frame of %d bytes exceeds %d: %w", m.Type(), n, MaxFrame, ErrMalformed)
	}
	be.PutUint32(b[start:], uint32(n))
	return b, nil
}

// Decode parses one frame body (type byte + payload). Data fields of the
// result alias body.
func Decode(body []byte) (Message, error) {
	if len(body) == 0 {
		return nil, fmt.Errorf("decode: empty frame: %w", ErrMalformed)
	}
	t, p := Type(body[0]), body[1:]
	var m Message
	var err error
	switch t {
	case TypeHello:
		m, err = decodeHello(p)
	case TypeWelcome:
		m, err = fixed(p, 24, t, func() Message {
			return &Welcome{Committed: be.Uint64(p), ImageSize: be.Uint64(p[8:]), StateLen: be.Uint64(p[16:])}
		})
	case TypeFetch:
		m, err = fixed(p, 21, t, func() Message {
			return &Fetch{ID: be.Uint64(p), Offset: be.Uint64(p[8:]), Length: be.Uint32(p[16:]),
				State: p[20]&fetchState != 0, Sequential: p[20]&fetchSequential != 0}
		})
		if err == nil && p[20]&^(fetchState|fetchSequential) != 0 {
			err = fmt.Errorf("decode fetch: flags %#x: %w", p[20], ErrMalformed)
		}
	case TypeRestoreHello:
		m, err = decodeRestoreHello(p)
	case TypeRestoreWelcome:
		m, err = fixed(p, 52, t, func() Message {
			return &RestoreWelcome{Committed: be.Uint64(p), Epoch: be.Uint64(p[8:]), ImageSize: be.Uint64(p[16:]),
				StateLen: be.Uint64(p[24:]), StateCRC: be.Uint32(p[32:]), Pages: be.Uint64(p[36:]), Runs: be.Uint64(p[44:])}
		})
	case TypeRuns:
		m, err = decodeRuns(p)
	case TypeRestorePages:
		m, err = decodeRestorePages(p)
	case TypePing:
		m, err = fixed(p, 8, t, func() Message { return &Ping{ID: be.Uint64(p)} })
	case TypePong:
		m, err = fixed(p, 8, t, func() Message { return &Pong{ID: be.Uint64(p)} })
	case TypePages:
		m, err = atLeast(p, 20, t, func() Message {
			return &Pages{ID: be.Uint64(p), Offset: be.Uint64(p[8:]), CRC: be.Uint32(p[16:]), Data: p[20:]}
		})
	case TypeExtent:
		m, err = atLeast(p, 20, t, func() Message {
			return &Extent{Epoch: be.Uint64(p), Offset: be.Uint64(p[8:]), CRC: be.Uint32(p[16:]), Data: p[20:]}
		})
	case TypeStateChunk:
		m, err = atLeast(p, 20, t, func() Message {
			return &StateChunk{Epoch: be.Uint64(p), Offset: be.Uint64(p[8:]), CRC: be.Uint32(p[16:]), Data: p[20:]}
		})
	case TypeCommit:
		m, err = fixed(p, 41, t, func() Message { return decodeCommit(p) })
		if err == nil && p[40] > 1 {
			err = fmt.Errorf("decode commit: restorable flag %d: %w", p[40], ErrMalformed)
		}
	case TypeAck:
		m, err = fixed(p, 8, t, func() Message { return &Ack{Epoch: be.Uint64(p)} })
	case TypeError:
		m, err = decodeError(p)
	default:
		return nil, fmt.Errorf("decode: unknown frame type %d: %w", body[0], ErrMalformed)
	}
	if err != nil {
		return nil, err
	}
	if err := Validate(m); err != nil {
		return nil, fmt.Errorf("decode %s: %w", t, err)
	}
	return m, nil
}

func fixed(p []byte, n int, t Type, mk func() Message) (Message, error) {
	if len(p) != n {
		return nil, fmt.Errorf("decode %s: payload %d bytes, want %d: %w", t, len(p), n, ErrMalformed)
	}
	return mk(), nil
}

func atLeast(p []byte, n int, t Type, mk func() Message) (Message, error) {
	if len(p) < n {
		return nil, fmt.Errorf("decode %s: payload %d bytes, want at least %d: %w", t, len(p), n, ErrMalformed)
	}
	return mk(), nil
}

func decodeHello(p []byte) (Message, error) {
	if len(p) < 3 {
		return nil, fmt.Errorf("decode hello: payload %d bytes: %w", len(p), ErrMalformed)
	}
	n := int(p[2])
	if len(p) != 3+n+16 {
		return nil, fmt.Errorf("decode hello: payload %d bytes, id of %d needs %d: %w", len(p), n, 3+n+16, ErrMalformed)
	}
	h := &Hello{Version: be.Uint16(p), VMID: string(p[3 : 3+n])}
	h.ImageSize = be.Uint64(p[3+n:])
	h.Epoch = be.Uint64(p[3+n+8:])
	return h, nil
}

func decodeRestoreHello(p []byte) (Message, error) {
	if len(p) < 3 {
		return nil, fmt.Errorf("decode restore hello: payload %d bytes: %w", len(p), ErrMalformed)
	}
	n := int(p[2])
	if len(p) != 3+n+9 {
		return nil, fmt.Errorf("decode restore hello: payload %d bytes, id of %d needs %d: %w", len(p), n, 3+n+9, ErrMalformed)
	}
	h := &RestoreHello{Version: be.Uint16(p), VMID: string(p[3 : 3+n]), Epoch: be.Uint64(p[3+n:])}
	switch p[3+n+8] {
	case 0:
	case 1:
		h.Resume = true
	default:
		return nil, fmt.Errorf("decode restore hello: resume flag %d: %w", p[3+n+8], ErrMalformed)
	}
	return h, nil
}

func decodeRuns(p []byte) (Message, error) {
	if len(p) < 4 {
		return nil, fmt.Errorf("decode runs: payload %d bytes: %w", len(p), ErrMalformed)
	}
	n := uint64(be.Uint32(p))
	if uint64(len(p)-4) != n*RunSize {
		return nil, fmt.Errorf("decode runs: payload %d bytes for %d runs: %w", len(p), n, ErrMalformed)
	}
	m := &Runs{Runs: make([]Run, n)}
	for i := range m.Runs {
		q := p[4+i*RunSize:]
		m.Runs[i] = Run{First: be.Uint64(q), Count: be.Uint32(q[8:]), Epoch: be.Uint64(q[12:])}
	}
	return m, nil
}

func decodeRestorePages(p []byte) (Message, error) {
	if len(p) < 24 {
		return nil, fmt.Errorf("decode restore pages: payload %d bytes: %w", len(p), ErrMalformed)
	}
	n := uint64(be.Uint32(p[20:]))
	if n > MaxData/PageSize || uint64(len(p)-24) != n*(PageSumSize+PageSize) {
		return nil, fmt.Errorf("decode restore pages: payload %d bytes for %d pages: %w", len(p), n, ErrMalformed)
	}
	m := &RestorePages{ID: be.Uint64(p), Offset: be.Uint64(p[8:]), CRC: be.Uint32(p[16:]), Sums: make([]PageSum, n)}
	for i := range m.Sums {
		q := p[24+i*PageSumSize:]
		m.Sums[i] = PageSum{CRC: be.Uint32(q), Epoch: be.Uint64(q[4:])}
	}
	m.Data = p[24+n*PageSumSize:]
	return m, nil
}

func decodeCommit(p []byte) Message {
	return &Commit{
		Epoch: be.Uint64(p), Extents: be.Uint64(p[8:]), Bytes: be.Uint64(p[16:]),
		Digest: be.Uint32(p[24:]), StateLen: be.Uint64(p[28:]), StateCRC: be.Uint32(p[36:]),
		Restorable: p[40] == 1,
	}
}

func decodeError(p []byte) (Message, error) {
	if len(p) < 4 {
		return nil, fmt.Errorf("decode error: payload %d bytes: %w", len(p), ErrMalformed)
	}
	n := int(be.Uint16(p[2:]))
	if len(p) != 4+n {
		return nil, fmt.Errorf("decode error: payload %d bytes, message of %d: %w", len(p), n, ErrMalformed)
	}
	return &Error{Code: ErrorCode(be.Uint16(p)), Message: string(p[4:])}, nil
}

// Reader reads frames from a stream, reusing one buffer.
type Reader struct {
	r   *bufio.Reader
	buf []byte
}

// NewReader reads frames from r.
func NewReader(r io.Reader) *Reader { return &Reader{r: bufio.NewReaderSize(r, 256<<10)} }

// Read returns the next message. io.EOF means a clean end between frames;
// a frame cut short is io.ErrUnexpectedEOF. The result's Data aliases the
// reader's buffer until the next Read.
func (r *Reader) Read() (Message, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r.r, hdr[:]); err != nil {
		if err == io.EOF {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("read frame header: %w", err)
	}
	n := be.Uint32(hdr[:])
	if n == 0 || n > MaxFrame {
		return nil, fmt.Errorf("read frame: length %d not in 1..%d: %w", n, MaxFrame, ErrMalformed)
	}
	if cap(r.buf) < int(n) {
		r.buf = make([]byte, n)
	}
	body := r.buf[:n]
	if _, err := io.ReadFull(r.r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("read frame body of %d bytes: %w", n, err)
	}
	return Decode(body)
}

// Buffered is the number of received bytes not yet decoded: a server
// answering pipelined requests may hold its flush while more are waiting.
func (r *Reader) Buffered() int { return r.r.Buffered() }

// Writer writes frames to a buffered stream; Flush pushes them out.
type Writer struct {
	w   *bufio.Writer
	buf []byte
}

// NewWriter writes frames to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: bufio.NewWriterSize(w, 256<<10)} }

// Write encodes and buffers one frame. Page data goes to the stream
// without an intermediate copy.
func (w *Writer) Write(m Message) error {
	if e, ok := m.(*Extent); ok {
		return w.writeData(m, e.Epoch, e.Offset, e.CRC, e.Data)
	}
	if s, ok := m.(*StateChunk); ok {
		return w.writeData(m, s.Epoch, s.Offset, s.CRC, s.Data)
	}
	if pg, ok := m.(*Pages); ok {
		return w.writeData(m, pg.ID, pg.Offset, pg.CRC, pg.Data)
	}
	if rp, ok := m.(*RestorePages); ok {
		return w.writeRestorePages(rp)
	}
	var err error
	w.buf, err = AppendFrame(w.buf[:0], m)
	if err != nil {
		return err
	}
	if _, err := w.w.Write(w.buf); err != nil {
		return fmt.Errorf("write %s frame: %w", m.Type(), err)
	}
	return nil
}

// Flush sends buffered frames.
func (w *Writer) Flush() error {
	if err := w.w.Flush(); err != nil {
		return fmt.Errorf("flush frames: %w", err)
	}
	return nil
}

// writeData writes an Extent, StateChunk or Pages (same layout: u64, u64
// offset, crc, data) without copying data into the frame buffer.
func (w *Writer) writeData(m Message, epoch, off uint64, crc uint32, data []byte) error {
	if err := Validate(m); err != nil {
		return fmt.Errorf("encode %s: %w", m.Type(), err)
	}
	w.buf = append(w.buf[:0], 0, 0, 0, 0, byte(m.Type()))
	w.buf = be.AppendUint64(w.buf, epoch)
	w.buf = be.AppendUint64(w.buf, off)
	w.buf = be.AppendUint32(w.buf, crc)
	be.PutUint32(w.buf, uint32(len(w.buf)-4+len(data)))
	if _, err := w.w.Write(w.buf); err != nil {
		return fmt.Errorf("write %s frame: %w", m.Type(), err)
	}
	if _, err := w.w.Write(data); err != nil {
		return fmt.Errorf("write %s frame data: %w", m.Type(), err)
	}
	return nil
}

// writeRestorePages writes a RestorePages frame without copying its data
// into the frame buffer.
func (w *Writer) writeRestorePages(m *RestorePages) error {
	if err := Validate(m); err != nil {
		return fmt.Errorf("encode %s: %w", m.Type(), err)
	}
	w.buf = append(w.buf[:0], 0, 0, 0, 0, byte(m.Type()))
	w.buf = be.AppendUint64(w.buf, m.ID)
	w.buf = be.AppendUint64(w.buf, m.Offset)
	w.buf = be.AppendUint32(w.buf, m.CRC)
	w.buf = be.AppendUint32(w.buf, uint32(len(m.Sums)))
	w.buf = AppendPageSums(w.buf, m.Sums)
	be.PutUint32(w.buf, uint32(len(w.buf)-4+len(m.Data)))
	if _, err := w.w.Write(w.buf); err != nil {
		return fmt.Errorf("write %s frame: %w", m.Type(), err)
	}
	if _, err := w.w.Write(m.Data); err != nil {
		return fmt.Errorf("write %s frame data: %w", m.Type(), err)
	}
	return nil
}
