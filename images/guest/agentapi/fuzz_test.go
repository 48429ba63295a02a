package agentapi

import (
	"encoding/json"
	"errors"
	"testing"
)

// FuzzDecodeRequest: any line either decodes into arguments of the right
// type that pass validation and survive a JSON round trip, or fails with
// ErrBadRequest; it never panics.
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		`{"id":1,"cmd":"ping"}`,
		`{"id":4,"cmd":"dirty","args":{"region":"a","size_mib":16,"rate_mib_s":8,"seed":5,"passes":2}}`,
		`{"id":5,"cmd":"stop","args":{"region":"a"}}`,
		`{"id":8,"cmd":"echo","args":{"action":"start","port":7}}`,
		`{"id":2,"cmd":"stats","args":{}}`,
		`{"cmd":"checksum","args":{"region":"r"}}`,
		`{"id":6,"cmd":"probe","args":{"addr":"10.0.0.2:7","proto":"udp","count":3,"interval_ms":10,"timeout_ms":500,"size":64}}`,
		`{"id":7,"cmd":"probe","args":{"addr":"[fd00::2]:7","proto":"tcp","count":1,"timeout_ms":1,"size":1048576}}`,
		`{"id":7,"cmd":"probe","args":{"addr":"10.0.0.2:0","proto":"sctp","count":0,"size":1}}`,
		`{"id":3,"cmd":"expected","args":{"size_mib":1,"seed":2,"passes_done":1,"page_in_pass":5}}`,
		`garbage`, `{}`, `null`, `[]`, `{"id":-1}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		req, args, err := DecodeRequest(line)
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error %v does not wrap ErrBadRequest", err)
			}
			return
		}
		switch a := args.(type) {
		case nil:
			if req.Cmd != CmdPing && req.Cmd != CmdStats && req.Cmd != CmdMemInfo {
				t.Fatalf("cmd %q decoded without args", req.Cmd)
			}
		case DirtyArgs:
			if req.Cmd != CmdDirty || a.Validate() != nil {
				t.Fatalf("cmd %q with invalid %+v accepted", req.Cmd, a)
			}
		case RegionArgs:
			if validRegion(req.Cmd, a.Region) != nil {
				t.Fatalf("bad region %q accepted", a.Region)
			}
		case ExpectedArgs:
			if req.Cmd != CmdExpected || a.Validate() != nil {
				t.Fatalf("cmd %q with invalid %+v accepted", req.Cmd, a)
			}
		case EchoArgs:
			if req.Cmd != CmdEcho || a.Validate() != nil {
				t.Fatalf("cmd %q with invalid %+v accepted", req.Cmd, a)
			}
		case ProbeArgs:
			if req.Cmd != CmdProbe || a.Validate() != nil {
				t.Fatalf("cmd %q with invalid %+v accepted", req.Cmd, a)
			}
		default:
			t.Fatalf("unexpected args type %T", args)
		}
		// Re-encoding what was accepted must decode to the same thing.
		again := Request{ID: req.ID, Cmd: req.Cmd}
		if args != nil {
			again.Args, _ = json.Marshal(args)
		}
		line2, _ := json.Marshal(again)
		req2, args2, err := DecodeRequest(line2)
		if err != nil || req2.ID != req.ID || req2.Cmd != req.Cmd || args2 != args {
			t.Fatalf("round trip of %s: %+v %#v %v", line2, req2, args2, err)
		}
	})
}

// FuzzParseCompact: the boot-time form fails cleanly or yields a request
// DecodeRequest accepts.
func FuzzParseCompact(f *testing.F) {
	for _, s := range []string{"ping", "dirty,region=boot,size_mib=8,seed=1", "echo,action=start,port=7", "probe,addr=10.0.0.2:7,proto=tcp,count=5,timeout_ms=100,size=16", "a,b=c,=", ",,,"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		req, args, err := ParseCompact(s)
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error %v does not wrap ErrBadRequest", err)
			}
			return
		}
		line, _ := json.Marshal(req)
		if _, args2, err := DecodeRequest(line); err != nil || args2 != args {
			t.Fatalf("%q: accepted but re-decoding gives %#v, %v", s, args2, err)
		}
	})
}
