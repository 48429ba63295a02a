package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"hostd/checkpoint/pki"
	"hostd/dataplane/repo"
	"hostd/hostd/config"
)

// startRepo runs the repo role: a page repository lending
// repo.capacity_mib of memory behind a mutual TLS listener. Like
// startBackup it returns once the listener is bound and the memory
// allocated, so a bad address, certificate or capacity fails the start.
func startRepo(ctx context.Context, cfg config.Config, log *slog.Logger) (srv *repo.Server, addr string, stop func(), id *pki.ServerIdentity, err error) {
	op := "start repo role"
	c := cfg.Repo
	id, err = pki.NewServerIdentity(c.TLS.CA, c.TLS.Cert, c.TLS.Key)
	if err != nil {
		return nil, "", nil, nil, fmt.Errorf("%s: %w", op, err)
	}
	tc := id.Config()
	quotas := make(map[string]int64, len(c.QuotasMiB))
	for name, q := range c.QuotasMiB {
		quotas[name] = q << 20
	}
	srv, err = repo.NewServer(tc, repo.ServerOptions{
		Capacity: c.CapacityMiB << 20, DefaultQuota: c.DefaultQuotaMiB << 20, Quotas: quotas,
		NoLock: !c.Lock, OrphanTimeout: c.OrphanTimeout.Duration, Logger: log,
	})
	if err != nil {
		return nil, "", nil, nil, fmt.Errorf("%s: %w (lower repo.capacity_mib?)", op, err)
	}
	ln, err := net.Listen("tcp", c.Listen)
	if err != nil {
		srv.Close()
		return nil, "", nil, nil, fmt.Errorf("%s: %w", op, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ctx, ln)
	}()
	st := srv.Status()
	log.Info("repo role serving", "listen", ln.Addr().String(), "capacity", st.Capacity, "locked", st.Locked)
	return srv, ln.Addr().String(), func() {
		cancel()
		<-done
		if err := srv.Close(); err != nil {
			log.Warn("release repository memory", "err", err)
		}
	}, id, nil
}
