// Package accept is the accept loop shared by hostd's servers (the backup
// role, page repositories, NBD swap devices): each connection is handled
// on its own goroutine, and a cancelled context closes the listener and
// waits for every handler to return.
package accept

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
)

// Serve accepts connections on ln until ctx ends, hands each to handle
// (whose context ends with ctx), then closes ln, waits for the handlers and
// returns ctx's error. Temporary accept errors are retried; any other ends
// the loop with an error naming the server.
func Serve(ctx context.Context, ln net.Listener, name string, handle func(context.Context, net.Conn)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("%s serve: accept: %w", name, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			handle(ctx, c)
		}()
	}
}
