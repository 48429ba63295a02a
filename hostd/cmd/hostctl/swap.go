package main

import (
	"context"
	"flag"
	"fmt"
	"strings"

	"hostd/hostd/swap"
)

// swap runs the cooperative swap commands: swap, memory, repo.
func (a *cli) swap(ctx context.Context, cmd string, args []string) error {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	size := fs.Int64("size", 0, "swap: device size in MiB")
	repos := fs.String("repos", "", "swap: repositories, host:port,...")
	del := fs.Bool("delete", false, "swap: unplug and remove the device (swapoff in the guest first)")
	name, rest := "", args
	if len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		name, rest = rest[0], rest[1:]
	}
	if err := fs.Parse(rest); err != nil {
		return usageError{err.Error()}
	}
	switch cmd {
	case "repo":
		r, err := a.c.Repo(ctx)
		if err != nil {
			return err
		}
		if a.json {
			return a.printJSON(r)
		}
		rows := [][]string{{"(all)", mib(r.Used), mib(r.Capacity), "", ""}}
		for _, c := range r.Clients {
			rows = append(rows, []string{c.Name, mib(c.Used), mib(c.Quota), fmt.Sprint(c.Sessions), fmt.Sprint(c.Connected)})
		}
		return a.table([]string{"CLIENT", "USED", "QUOTA/CAPACITY", "SESSIONS", "CONNECTED"}, rows)
	case "memory":
		if name == "" || fs.NArg() != 1 {
			return usageError{"memory NAME TARGET_MIB"}
		}
		var target uint64
		if _, err := fmt.Sscan(fs.Arg(0), &target); err != nil {
			return usageError{fmt.Sprintf("memory: target %q is not a number of MiB", fs.Arg(0))}
		}
		s, err := a.c.SetMemory(ctx, name, target)
		if err != nil {
			return err
		}
		if a.json {
			return a.printJSON(s)
		}
		return a.table([]string{"MEMORY", "BALLOON", "RSS"}, [][]string{{
			fmt.Sprintf("%d MiB", s.MemoryMiB), fmt.Sprintf("%d MiB", s.BalloonMiB), fmt.Sprintf("%d MiB", s.RSSMiB)}})
	}
	var (
		list []swap.Status
		err  error
	)
	switch {
	case name == "":
		list, err = a.c.ListSwap(ctx)
	case *del:
		if err := a.c.DeleteSwap(ctx, name); err != nil {
			return err
		}
		fmt.Fprintf(a.out, "swap of %s removed\n", name)
		return nil
	case *size != 0 || *repos != "":
		var r []string
		if *repos != "" {
			r = strings.Split(*repos, ",")
		}
		var s swap.Status
		s, err = a.c.PutSwap(ctx, name, swap.Request{SizeMiB: *size, Repos: r})
		list = []swap.Status{s}
	default:
		var s swap.Status
		s, err = a.c.Swap(ctx, name)
		list = []swap.Status{s}
	}
	if err != nil {
		return err
	}
	if a.json {
		if name != "" {
			return a.printJSON(list[0])
		}
		return a.printJSON(list)
	}
	rows := make([][]string, 0, len(list))
	for _, s := range list {
		links := make([]string, 0, len(s.Stats.Repos))
		for _, r := range s.Stats.Repos {
			state := "down"
			if r.Connected {
				state = "up"
			}
			links = append(links, r.Addr+":"+state)
		}
		over := "no"
		if s.Overload.Overloaded {
			over = "yes"
		}
		rows = append(rows, []string{s.VM, fmt.Sprintf("%d MiB", s.SizeMiB), fmt.Sprint(s.Stats.PagesRemote), fmt.Sprint(s.Stats.PagesLocalOnly),
			fmt.Sprintf("%.0f", s.Overload.Rate), over, fmt.Sprintf("%.0fs", s.Overload.ThresholdS), strings.Join(links, " ")})
	}
	return a.table([]string{"VM", "SIZE", "REMOTE", "LOCAL-ONLY", "PAGES/S", "OVERLOADED", "THRESHOLD", "REPOS"}, rows)
}

func mib(b int64) string { return fmt.Sprintf("%d MiB", b>>20) }
