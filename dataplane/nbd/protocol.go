package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
)

// Protocol constants, named as in the NBD protocol document.
const (
	magicNBD       = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt  = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply  = 0x0003e889045565a9
	magicRequest   = 0x25609513
	magicSimpleRep = 0x67446698

	flagFixedNewstyle = 1 << 0 // handshake flags (server) and client flags
	flagNoZeroes      = 1 << 1

	optExportName     = 1
	optAbort          = 2
	optList           = 3
	optStartTLS       = 5
	optInfo           = 6
	optGo             = 7
	optStructuredRepl = 8

	repAck          = 1
	repServer       = 2
	repInfo         = 3
	repErrUnsup     = 1<<31 + 1
	repErrPolicy    = 1<<31 + 2
	repErrInvalid   = 1<<31 + 3
	repErrUnknown   = 1<<31 + 6
	repErrBlockSize = 1<<31 + 8

	infoExport    = 0
	infoBlockSize = 3

	tflagHasFlags  = 1 << 0
	tflagSendFlush = 1 << 2
	tflagSendFUA   = 1 << 3
	tflagSendTrim  = 1 << 5

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
	cmdResize      = 8

	cmdFlagFUA = 1 << 0

	// RequestHeaderSize is the size of a transmission request header.
	RequestHeaderSize = 28
	replyHeaderSize   = 16
	optHeaderSize     = 16

	// BlockSize is the alignment of every offset and length. 512 is what
	// a virtio disk's logical sector is by default, so guests never need
	// anything finer.
	BlockSize = 512
	// PreferredBlockSize is what clients are told to prefer: the page size
	// of swap and of the backend.
	PreferredBlockSize = 4096
	// DefaultMaxRequest bounds the payload of one request.
	DefaultMaxRequest = 32 << 20

	// maxOptionData bounds an option's payload during the handshake; names
	// are at most 4096 bytes by the protocol, info requests a few more.
	maxOptionData = 8192
	maxNameLen    = 4096
)

// NBD error numbers in replies (Linux values, fixed by the protocol).
const (
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

var be = binary.BigEndian

// ErrMalformed is wrapped by every error caused by a peer's bytes that
// breaks the protocol (the connection is then closed).
var ErrMalformed = errors.New("nbd: malformed")

// Request is a decoded transmission request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Offset uint64
	Length uint32
}

// DecodeRequest decodes a 28-byte request header. Only the magic is
// checked here: a bad magic means the stream is lost.
func DecodeRequest(b []byte) (Request, error) {
	if len(b) != RequestHeaderSize {
		return Request{}, fmt.Errorf("%w: request header of %d bytes", ErrMalformed, len(b))
	}
	if m := be.Uint32(b[0:]); m != magicRequest {
		return Request{}, fmt.Errorf("%w: request magic %#x", ErrMalformed, m)
	}
	return Request{
		Flags:  be.Uint16(b[4:]),
		Type:   be.Uint16(b[6:]),
		Handle: be.Uint64(b[8:]),
		Offset: be.Uint64(b[16:]),
		Length: be.Uint32(b[24:]),
	}, nil
}

// AppendRequest encodes r (clients, tests).
func AppendRequest(b []byte, r Request) []byte {
	b = be.AppendUint32(b, magicRequest)
	b = be.AppendUint16(b, r.Flags)
	b = be.AppendUint16(b, r.Type)
	b = be.AppendUint64(b, r.Handle)
	b = be.AppendUint64(b, r.Offset)
	return be.AppendUint32(b, r.Length)
}

// verdict says what the server does with a decoded request.
type verdict int

const (
	doServe      verdict = iota
	doReject             // reply with the errno, skipping a write payload
	doDisconnect         // the stream cannot continue
)

// Check validates r against an export of size bytes and the request
// limit. It returns the NBD error number to reply with (0: valid) and
// whether the connection must be dropped instead: a write whose payload
// is above maxReq cannot be skipped safely.
func Check(r Request, size int64, maxReq uint32) (errno uint32, disconnect bool) {
	v, e := check(r, size, maxReq)
	return e, v == doDisconnect
}

func check(r Request, size int64, maxReq uint32) (verdict, uint32) {
	if r.Type == cmdWrite && r.Length > maxReq {
		return doDisconnect, errInval
	}
	switch r.Type {
	case cmdRead, cmdWrite, cmdTrim:
	case cmdFlush:
		if r.Offset != 0 || r.Length != 0 || r.Flags != 0 {
			return doReject, errInval
		}
		return doServe, 0
	case cmdDisc:
		return doServe, 0
	case cmdCache, cmdWriteZeroes, cmdBlockStatus, cmdResize:
		return doReject, errNotSup
	default:
		return doReject, errInval
	}
	allowed := uint16(0)
	if r.Type == cmdWrite || r.Type == cmdTrim {
		allowed = cmdFlagFUA
	}
	if r.Flags&^allowed != 0 {
		return doReject, errInval
	}
	if r.Length == 0 || r.Length > maxReq && r.Type != cmdTrim {
		return doReject, errInval
	}
	if r.Offset%BlockSize != 0 || r.Length%BlockSize != 0 {
		return doReject, errInval
	}
	if r.Offset > uint64(size) || uint64(r.Length) > uint64(size)-r.Offset {
		if r.Type == cmdWrite {
			return doReject, errNoSpc // the protocol's answer to a write past the end
		}
		return doReject, errInval
	}
	return doServe, 0
}

// errnoOf maps a backend error to an NBD error number.
func errnoOf(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return errNoSpc
	case errors.Is(err, syscall.EINVAL):
		return errInval
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EACCES):
		return errPerm
	case errors.Is(err, syscall.ENOMEM):
		return errNoMem
	case errors.Is(err, syscall.ESHUTDOWN):
		return errShutdown
	}
	return errIO
}

// ReplyError is an error reply from the server; it unwraps to the
// syscall.Errno, so errors.Is(err, syscall.ENOSPC) works.
type ReplyError struct{ Errno syscall.Errno }

func (e *ReplyError) Error() string { return "nbd: server replied error: " + e.Errno.Error() }
func (e *ReplyError) Unwrap() error { return e.Errno }

// errorOf is the client side: an NBD error number as a Go error.
func errorOf(errno uint32) error {
	if errno == 0 {
		return nil
	}
	return &ReplyError{syscall.Errno(errno)}
}

// goRequest is a decoded NBD_OPT_INFO / NBD_OPT_GO payload.
type goRequest struct {
	name  string
	infos []uint16
}

// parseGo decodes NBD_OPT_INFO / NBD_OPT_GO data: name length, name,
// number of info requests, info types. Trailing bytes are an error.
func parseGo(d []byte) (goRequest, error) {
	if len(d) < 6 {
		return goRequest{}, fmt.Errorf("%w: go option of %d bytes", ErrMalformed, len(d))
	}
	n := be.Uint32(d)
	if n > maxNameLen || uint64(n)+6 > uint64(len(d)) {
		return goRequest{}, fmt.Errorf("%w: go option name length %d in %d bytes", ErrMalformed, n, len(d))
	}
	g := goRequest{name: string(d[4 : 4+n])}
	rest := d[4+n:]
	k := int(be.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*k {
		return goRequest{}, fmt.Errorf("%w: go option announces %d info requests in %d bytes", ErrMalformed, k, len(rest))
	}
	for i := 0; i < k; i++ {
		g.infos = append(g.infos, be.Uint16(rest[2*i:]))
	}
	return g, nil
}

func appendGo(b []byte, name string, infos ...uint16) []byte {
	b = be.AppendUint32(b, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = be.AppendUint16(b, i)
	}
	return b
}
