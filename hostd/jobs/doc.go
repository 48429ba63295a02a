// Package jobs runs hostd's long operations (shutdown now; evacuate, restore
// and migrate later) as jobs with IDs, progress and a final report, so that
// an API call returns at once and the scheduler follows the job through
// GET /v1/jobs/{id} or the event stream.
//
// Every state change is written to the store before it is published, so a
// job's outcome survives a daemon restart; a job that was running when the
// daemon died is marked "interrupted" on the next start rather than left
// "running" forever.
package jobs
