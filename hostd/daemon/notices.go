package daemon

import (
	"context"
	"errors"
	"log/slog"

	"hostd/hostd/config"
	"hostd/hostd/notice"
	"hostd/hostd/protect"
)

// watchNotices runs the enabled termination-notice watchers until ctx
// ends. A notice evacuates every protected VM before its deadline; the
// notice and the evacuation job are on the event stream.
func watchNotices(ctx context.Context, c config.Notice, prot *protect.Manager, log *slog.Logger) {
	pc := func(w config.Watcher) notice.ProviderConfig {
		return notice.ProviderConfig{Enabled: w.Enabled, BaseURL: w.BaseURL, Interval: w.Interval.Duration}
	}
	cfg := notice.Config{EC2: pc(c.EC2), GCE: pc(c.GCE), Azure: notice.AzureConfig{ProviderConfig: pc(c.Azure)}}
	err := notice.Start(ctx, cfg, log, func(n notice.Notice) {
		log.Warn("termination notice: evacuating protected VMs", "provider", n.Provider, "action", n.Action, "deadline", n.Deadline)
		prot.Notice(ctx, n.Provider, n.Action, n.Deadline)
	})
	if err != nil && !errors.Is(err, context.Canceled) {
		log.Error("termination notice watchers", "err", err)
	}
}
