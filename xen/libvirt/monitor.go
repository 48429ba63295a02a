package libvirt

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	golibvirt "libvirt.org/go/libvirt"

	"hostd/xen"
)

// Command runs one QMP command on a running domain's QEMU through libvirt's
// monitor passthrough. libvirt marks the domain "tainted" (custom-monitor);
// that is expected.
func (d *Driver) Command(ctx context.Context, domain, execute string, args any) (json.RawMessage, error) {
	return d.monitor(ctx, domain, execute, args, nil)
}

// CommandWithFiles is Command with file descriptors passed along (SCM_RIGHTS
// to QEMU), for getfd and add-fd. The files stay the caller's.
func (d *Driver) CommandWithFiles(ctx context.Context, domain, execute string, args any, files []*os.File) (json.RawMessage, error) {
	if len(files) == 0 {
		return nil, fmt.Errorf("qemu monitor %s on domain %q: no files given; use Command", execute, domain)
	}
	return d.monitor(ctx, domain, execute, args, files)
}

func (d *Driver) monitor(ctx context.Context, domain, execute string, args any, files []*os.File) (json.RawMessage, error) {
	cmd, err := json.Marshal(qmpCommand{Execute: execute, Arguments: args})
	if err != nil {
		return nil, fmt.Errorf("qemu monitor %s on domain %q: encode arguments: %w", execute, domain, err)
	}
	var reply string
	err = d.withDomain(ctx, "qemu monitor "+execute+" on", domain, func(_ *golibvirt.Connect, dom *golibvirt.Domain) error {
		if len(files) == 0 {
			reply, err = dom.QemuMonitorCommand(string(cmd), golibvirt.DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
			return err
		}
		in := make([]os.File, len(files))
		for i, f := range files {
			in[i] = *f // the binding wants values; they share f's descriptor
		}
		var out []*os.File
		reply, out, err = dom.QemuMonitorCommandWithFiles(string(cmd), in, golibvirt.DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
		for _, f := range out {
			f.Close() // no QMP command we use returns descriptors
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return decodeQMPReply(execute, reply)
}

type qmpCommand struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
}

// decodeQMPReply returns a QMP reply's "return", or its "error" as a
// *xen.MonitorError.
func decodeQMPReply(execute, reply string) (json.RawMessage, error) {
	var r struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(reply), &r); err != nil {
		return nil, fmt.Errorf("qemu monitor %s: undecodable reply %q: %w", execute, reply, err)
	}
	if r.Error != nil {
		return nil, fmt.Errorf("qemu monitor %s: %w", execute, &xen.MonitorError{Command: execute, Class: r.Error.Class, Desc: r.Error.Desc})
	}
	if r.Return == nil {
		return nil, fmt.Errorf("qemu monitor %s: reply %q has neither return nor error", execute, reply)
	}
	return r.Return, nil
}
