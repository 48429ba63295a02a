package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"hostd/checkpoint/backup"
	"hostd/checkpoint/backupstore"
	"hostd/checkpoint/pki"
	"hostd/hostd/config"
)

// startBackup runs the backup role: the checkpoint store behind a mutual
// TLS listener. It returns once the listener is bound (so a bad address or
// certificate fails the start); the returned function stops it and waits.
func startBackup(ctx context.Context, cfg config.Config, log *slog.Logger) (stop func(), addr string, id *pki.ServerIdentity, err error) {
	op := "start backup role"
	id, err = pki.NewServerIdentity(cfg.Backup.TLS.CA, cfg.Backup.TLS.Cert, cfg.Backup.TLS.Key)
	if err != nil {
		return nil, "", nil, fmt.Errorf("%s: %w", op, err)
	}
	tc := id.Config()
	st, err := backupstore.Open(cfg.BackupDir(), backupstore.Options{Logger: log})
	if err != nil {
		return nil, "", nil, fmt.Errorf("%s: %w", op, err)
	}
	srv, err := backup.New(st, tc, backup.Options{Logger: log})
	if err != nil {
		st.Close()
		return nil, "", nil, fmt.Errorf("%s: %w", op, err)
	}
	ln, err := net.Listen("tcp", cfg.Backup.Listen)
	if err != nil {
		st.Close()
		return nil, "", nil, fmt.Errorf("%s: %w", op, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ctx, ln)
	}()
	log.Info("backup role serving", "listen", ln.Addr().String(), "dir", cfg.BackupDir())
	return func() {
		cancel()
		<-done
		if err := st.Close(); err != nil {
			log.Warn("close backup store", "err", err)
		}
	}, ln.Addr().String(), id, nil
}
