// Package restore benchmarks restoring real guests through a real hostd
// (issue 4): a VM protected to a backup-role hostd in its own network
// namespace is evacuated (after=destroy) and deleted, then brought back
// from the backup's restore point through POST /v1/vms/restore, lazily and
// in full, each time as a new VM on the same host (a second host is the
// integration tests' business). `make bench-restore` runs it beside the
// library figures of checkpoint/bench.
//
// Every source guest holds a working set its agent wrote, so the restore
// point is not mostly zeros: a finished region a (half its memory for
// 1 GiB, a quarter for 128 MiB, whose kernel leaves little room; seeded
// pattern) and a region w whose unpaced dirty workload runs through the
// evacuation. After each restore, once resident, a's checksum (on the
// first restore of each kind: SHA-256 runs at ~10 MiB/s under TCG) and w's
// are checked and w must have gone on counting; the VM is then deleted,
// so at most one 1 GiB guest lives at a time. The veth to the backup is
// not throttled: tc on its host end would slow only the protection's first
// copy (a restore flows the other way); the windowed restore is stretched
// by its own RestoreRequest.PrefetchRate instead.
//
// Figures (`bench: NAME VALUE UNIT`), resume times the median of three
// restores of the same restore point:
//
//   - lazy_resume_ms_128m, lazy_resume_ms_1g: RestoreReport.ResumeMS, from
//     the restore call to the guest running, of a 128 MiB and a 1 GiB
//     guest, prefetch unthrottled. lazy_resume_size_ratio is the second
//     over the first: a lazy resume loads only the device state, so it
//     should stay near 1 whatever the guest's size.
//   - lazy_resume_ms_warm_1g: ResumeMS of a lazy restore of the same
//     1 GiB restore point into the host's warm slot (a paused QEMU of
//     that shape on an empty memory server, started before the restore
//     call: the restore only claims it, loads the device state and
//     resumes); the cold figures above pass slot "cold".
//     warm_over_cold_resume_1g is it over lazy_resume_ms_1g. Before each
//     warm restore the bench waits for the slot's refill.
//   - full_resume_ms_1g: ResumeMS of a full restore of the same 1 GiB
//     restore point (every non-zero page copied before the guest starts:
//     the stop-and-copy baseline).
//   - residency_over_full_copy_vm: the lazy 1 GiB restores' ResidentMS
//     (call to every page local, with the unthrottled prefetch) over
//     full_resume_ms_1g: what the lazy path pays to become independent of
//     the backup, against the full-copy path that is independent before
//     the guest runs.
//   - lazy_window_workload_ratio: w's pages/s (agent Ops, 8 s in 1 s
//     slices, logged) in the lazy window, from the resume of a restore
//     whose prefetch is throttled to 32 MiB/s (a window of ~20 s), over
//     the same 8 s measured right after that restore's residency: what
//     faults and the prefetcher cost the guest. For context the log also
//     has the same workload's rate in the original guest and in a
//     full-restored one.
//   - vm_fault_p50_us, vm_fault_p99_us: remote-fault service times from the
//     windowed restore's report (the restore in which the guest works while
//     pages are missing); checkpoint/bench prints the library's own
//     fault_p50_us / fault_p99_us.
package restore
