package repo

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"
	"unicode/utf8"
)

// Version is the protocol version of Hello and Welcome.
const Version = 1

// PageSize is the unit of storage: every Put stores whole pages and every
// page gets its own capability.
const PageSize = 4096

// MaxPages bounds the pages of one Put, Get or Free frame (1 MiB of data).
const MaxPages = 256

// MaxFrame is the largest frame body (type byte + payload) accepted.
const MaxFrame = 1 + 8 + 2 + MaxPages + MaxPages*PageSize + 64

const maxMessage = 1024

// Cap is a page's capability: 128 random bits the server chose when it
// stored the page. Only the session that stored a page can use its Cap;
// any other use is answered as if the page did not exist.
type Cap [16]byte

func (c Cap) String() string { return hex.EncodeToString(c[:4]) + "…" } // never log a whole capability

// ErrMalformed is wrapped by every decoding error caused by a peer's bytes.
var ErrMalformed = errors.New("repo: malformed frame")

// Type is a frame's type byte.
type Type uint8

const (
	TypeHello     Type = 1  // client → server, first frame
	TypeWelcome   Type = 2  // server → client, answers Hello
	TypePut       Type = 3  // client → server: store pages
	TypeStored    Type = 4  // server → client: their capabilities
	TypeGet       Type = 5  // client → server: read pages by capability
	TypeData      Type = 6  // server → client: the pages that exist
	TypeFree      Type = 7  // client → server: release pages
	TypeFreed     Type = 8  // server → client
	TypeReclaim   Type = 9  // server → client: give back Bytes
	TypeReclaimed Type = 10 // client → server: done, this many freed
	TypeError     Type = 11 // either way; ID 0 ends the connection
)

// Message is one decoded frame.
type Message interface {
	Type() Type
	appendPayload(b []byte) []byte
}

// Hello opens a connection. Session names the client's set of pages: a
// client reconnecting with the same Session (and the same certificate)
// finds its pages again, as long as it comes back within the server's
// orphan timeout.
type Hello struct {
	Version uint16
	Session [16]byte
}

// Welcome answers Hello. Instance is random per server start: pages of
// another instance are gone. Quota and Used are the client identity's
// (certificate common name's) bytes; Available is what it may still Put.
type Welcome struct {
	Version   uint16
	Instance  [16]byte
	Quota     uint64
	Used      uint64
	Available uint64
}

// Put stores len(Data)/PageSize pages (1..MaxPages).
type Put struct {
	ID   uint64
	Data []byte
}

// Stored answers Put: one capability per page, in order.
type Stored struct {
	ID        uint64
	Available uint64
	Caps      []Cap
}

// Get reads pages.
type Get struct {
	ID   uint64
	Caps []Cap
}

// Data answers Get: Present says which capabilities were found; Data holds
// the found pages only, in order.
type Data struct {
	ID      uint64
	Present []bool
	Data    []byte
}

// Free releases pages; unknown capabilities are ignored (and not counted).
type Free struct {
	ID   uint64
	Caps []Cap
}

// Freed answers Free with the number of pages released.
type Freed struct {
	ID        uint64
	Available uint64
	N         uint16
}

// Reclaim asks the client to give back Bytes of its pages (keeping them
// on its own disk). The client answers Reclaimed with the same ID once its
// Frees are sent.
type Reclaim struct {
	ID    uint64
	Bytes uint64
}

// Reclaimed answers Reclaim.
type Reclaimed struct {
	ID    uint64
	Bytes uint64
}

// Error answers the request ID, or with ID 0 says why the connection ends.
type Error struct {
	ID      uint64
	Code    ErrorCode
	Message string
}

// ErrorCode classifies an Error.
type ErrorCode uint16

const (
	CodeInternal  ErrorCode = 1
	CodeMalformed ErrorCode = 2 // the peer sent a bad frame
	CodeProtocol  ErrorCode = 3 // a good frame at the wrong time
	CodeQuota     ErrorCode = 4 // the client's quota is used up
	CodeFull      ErrorCode = 5 // the repository's memory is used up
	CodeShutdown  ErrorCode = 6
)

func (e *Error) Error() string { return fmt.Sprintf("repo error %d: %s", e.Code, e.Message) }

func (*Hello) Type() Type     { return TypeHello }
func (*Welcome) Type() Type   { return TypeWelcome }
func (*Put) Type() Type       { return TypePut }
func (*Stored) Type() Type    { return TypeStored }
func (*Get) Type() Type       { return TypeGet }
func (*Data) Type() Type      { return TypeData }
func (*Free) Type() Type      { return TypeFree }
func (*Freed) Type() Type     { return TypeFreed }
func (*Reclaim) Type() Type   { return TypeReclaim }
func (*Reclaimed) Type() Type { return TypeReclaimed }
func (*Error) Type() Type     { return TypeError }

var be = binary.BigEndian

func appendCaps(b []byte, caps []Cap) []byte {
	b = be.AppendUint16(b, uint16(len(caps)))
	for _, c := range caps {
		b = append(b, c[:]...)
	}
	return b
}

func (m *Hello) appendPayload(b []byte) []byte {
	b = be.AppendUint16(b, m.Version)
	return append(b, m.Session[:]...)
}
func (m *Welcome) appendPayload(b []byte) []byte {
	b = be.AppendUint16(b, m.Version)
	b = append(b, m.Instance[:]...)
	b = be.AppendUint64(b, m.Quota)
	b = be.AppendUint64(b, m.Used)
	return be.AppendUint64(b, m.Available)
}
func (m *Put) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	b = be.AppendUint16(b, uint16(len(m.Data)/PageSize))
	return append(b, m.Data...)
}
func (m *Stored) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	b = be.AppendUint64(b, m.Available)
	return appendCaps(b, m.Caps)
}
func (m *Get) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	return appendCaps(b, m.Caps)
}
func (m *Data) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	b = be.AppendUint16(b, uint16(len(m.Present)))
	for _, p := range m.Present {
		if p {
			b = append(b, 1)
		} else {
			b = append(b, 0)
		}
	}
	return append(b, m.Data...)
}
func (m *Free) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	return appendCaps(b, m.Caps)
}
func (m *Freed) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	b = be.AppendUint64(b, m.Available)
	return be.AppendUint16(b, m.N)
}
func (m *Reclaim) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	return be.AppendUint64(b, m.Bytes)
}
func (m *Reclaimed) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	return be.AppendUint64(b, m.Bytes)
}
func (m *Error) appendPayload(b []byte) []byte {
	b = be.AppendUint64(b, m.ID)
	b = be.AppendUint16(b, uint16(m.Code))
	b = be.AppendUint16(b, uint16(len(m.Message)))
	return append(b, m.Message...)
}

// AppendFrame appends m as a frame (length, type, payload). It refuses
// messages that Decode would refuse, so a bug cannot put a bad frame on
// the wire.
func AppendFrame(b []byte, m Message) ([]byte, error) {
	start := len(b)
	b = append(b, 0, 0, 0, 0, byte(m.Type()))
	b = m.appendPayload(b)
	body := b[start+4:]
	if _, err := Decode(body); err != nil {
		return b[:start], fmt.Errorf("encode %T: %w", m, err)
	}
	be.PutUint32(b[start:], uint32(len(body)))
	return b, nil
}

// decoder reads fields and remembers the first shortfall.
type decoder struct {
	b   []byte
	bad bool
}

func (d *decoder) take(n int) []byte {
	if d.bad || n < 0 || len(d.b) < n {
		d.bad = true
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}
func (d *decoder) u16() uint16 {
	if v := d.take(2); v != nil {
		return be.Uint16(v)
	}
	return 0
}
func (d *decoder) u64() uint64 {
	if v := d.take(8); v != nil {
		return be.Uint64(v)
	}
	return 0
}
func (d *decoder) id16() (x [16]byte) {
	copy(x[:], d.take(16))
	return x
}

// count reads a page count and checks it is 1..MaxPages.
func (d *decoder) count() int {
	n := int(d.u16())
	if n < 1 || n > MaxPages {
		d.bad = true
		return 0
	}
	return n
}

func (d *decoder) caps() []Cap {
	n := d.count()
	raw := d.take(16 * n)
	if d.bad {
		return nil
	}
	caps := make([]Cap, n)
	for i := range caps {
		copy(caps[i][:], raw[16*i:])
	}
	return caps
}

// Decode decodes a frame body (type byte + payload). Every field is
// checked: counts in range, exact lengths, no trailing bytes. Data fields
// alias body.
func Decode(body []byte) (Message, error) {
	if len(body) == 0 {
		return nil, fmt.Errorf("%w: empty frame", ErrMalformed)
	}
	if len(body) > MaxFrame {
		return nil, fmt.Errorf("%w: frame of %d bytes", ErrMalformed, len(body))
	}
	t := Type(body[0])
	d := &decoder{b: body[1:]}
	var m Message
	switch t {
	case TypeHello:
		m = &Hello{Version: d.u16(), Session: d.id16()}
	case TypeWelcome:
		m = &Welcome{Version: d.u16(), Instance: d.id16(), Quota: d.u64(), Used: d.u64(), Available: d.u64()}
	case TypePut:
		p := &Put{ID: d.u64()}
		p.Data = d.take(d.count() * PageSize)
		m = p
	case TypeStored:
		m = &Stored{ID: d.u64(), Available: d.u64(), Caps: d.caps()}
	case TypeGet:
		m = &Get{ID: d.u64(), Caps: d.caps()}
	case TypeData:
		g := &Data{ID: d.u64()}
		st := d.take(d.count())
		found := 0
		for _, s := range st {
			switch s {
			case 0:
				g.Present = append(g.Present, false)
			case 1:
				g.Present = append(g.Present, true)
				found++
			default:
				d.bad = true
			}
		}
		g.Data = d.take(found * PageSize)
		m = g
	case TypeFree:
		m = &Free{ID: d.u64(), Caps: d.caps()}
	case TypeFreed:
		m = &Freed{ID: d.u64(), Available: d.u64(), N: d.u16()}
	case TypeReclaim:
		m = &Reclaim{ID: d.u64(), Bytes: d.u64()}
	case TypeReclaimed:
		m = &Reclaimed{ID: d.u64(), Bytes: d.u64()}
	case TypeError:
		e := &Error{ID: d.u64(), Code: ErrorCode(d.u16())}
		n := int(d.u16())
		if n > maxMessage {
			d.bad = true
		}
		e.Message = string(d.take(n))
		if !utf8.ValidString(e.Message) {
			d.bad = true
		}
		m = e
	default:
		return nil, fmt.Errorf("%w: unknown type %d", ErrMalformed, t)
	}
	if d.bad {
		return nil, fmt.Errorf("%w: bad %T payload", ErrMalformed, m)
	}
	if len(d.b) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes after %T", ErrMalformed, len(d.b), m)
	}
	return m, nil
}

// ReadFrame reads one frame into a fresh buffer (messages alias it, so
// they may be handed to other goroutines) and decodes it.
func ReadFrame(r *bufio.Reader) (Message, error) {
	var h [4]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	n := be.Uint32(h[:])
	if n == 0 || n > MaxFrame {
		return nil, fmt.Errorf("%w: frame length %d", ErrMalformed, n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("read frame body: %w", err)
	}
	return Decode(body)
}

// frameWriter sends whole frames on a connection; both ends embed it, and
// any goroutine may send (a frame is never interleaved with another).
type frameWriter struct {
	wmu sync.Mutex
	w   *bufio.Writer
}

func (f *frameWriter) send(m Message) error {
	b, err := AppendFrame(nil, m)
	if err != nil {
		return err
	}
	f.wmu.Lock()
	defer f.wmu.Unlock()
	if _, err := f.w.Write(b); err != nil {
		return err
	}
	return f.w.Flush()
}
