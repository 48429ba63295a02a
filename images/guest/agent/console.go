package main

import (
	"io"
	"os"
)

// console writes lines to the serial console. A 115200-baud UART under TCG
// needs milliseconds per line, so lines go through a queue drained by one
// goroutine: a request handler never waits on the UART, and when the queue
// is full a line is dropped rather than stalling the protocol.
type console struct {
	lines chan line
}

type line struct {
	text string
	done chan struct{} // closed once written; nil for fire-and-forget
}

// openConsole writes to /dev/console, or to stdout (which /init also
// points at the console) if that cannot be opened.
func openConsole() *console {
	var w io.Writer = os.Stdout
	if f, err := os.OpenFile("/dev/console", os.O_WRONLY|os.O_APPEND, 0); err == nil {
		w = f
	}
	return newConsole(w)
}

func newConsole(w io.Writer) *console {
	c := &console{lines: make(chan line, 256)}
	go func() {
		for l := range c.lines {
			// One write per line keeps it whole between kernel messages.
			_, _ = io.WriteString(w, l.text+"\n")
			if l.done != nil {
				close(l.done)
			}
		}
	}()
	return c
}

// print queues a line, dropping it if the console is backed up.
func (c *console) print(text string) {
	select {
	case c.lines <- line{text: text}:
	default:
	}
}

// printSync writes a line and waits until it is out; used for the ready
// line, which must never be dropped.
func (c *console) printSync(text string) {
	done := make(chan struct{})
	c.lines <- line{text: text, done: done}
	<-done
}
