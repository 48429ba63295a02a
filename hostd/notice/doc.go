// Package notice watches the cloud's metadata service for the warning that
// the machine hostd runs on is about to be taken away: an EC2 spot
// interruption (IMDSv2 spot/instance-action), a GCE preemption (the
// instance/preempted metadata key) or an Azure Scheduled Event of type
// Preempt or Terminate.
//
// Its place in hostd: a blanket host is often a spot VM, and the whole point
// of continuous checkpointing (../../checkpoint) is that every protected
// nested VM can be committed to its backup server within the provider's
// warning. This package only turns the provider's metadata into a Notice
// with a deadline; the daemon (hostd/daemon) starts the watchers that the
// [notice] section of hostd.toml enables, and on a Notice evacuates every
// protected VM at once (what POST /v1/host/evacuate does) with the notice's
// deadline, and publishes the notice on the event stream (hostd/events) so
// the scheduler learns of it too.
//
// Each watcher polls at its provider's documented cadence (EC2 and GCE every
// 5 s, Azure every second; GCE long-polls with wait_for_change when the
// server supports it), delivers each distinct notice once, and treats an
// unreachable metadata server as a condition to log and retry, never as
// fatal: hostd must keep running on a machine where the service is down for a
// moment, or absent because the provider was configured by mistake.
//
// The watchers are off by default: polling 169.254.169.254 on a machine that
// is not on that cloud is useless, and on some networks that address is
// something else.
//
// The configuration the daemon is expected to map from hostd.toml:
//
//	[notice.ec2]
//	enabled = false
//	base_url = "http://169.254.169.254"
//	interval = "5s"
//	[notice.gce]
//	enabled = false
//	base_url = "http://169.254.169.254"
//	interval = "5s"
//	[notice.azure]
//	enabled = false
//	base_url = "http://169.254.169.254"
//	interval = "1s"
//	acknowledge = false
package notice
