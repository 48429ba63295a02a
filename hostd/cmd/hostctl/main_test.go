package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"hostd/hostd/jobs"
)

// A job's outcome decides the command's exit in both output formats.
func TestJobOutFailsOnAFailedJobInEveryFormat(t *testing.T) {
	for _, tc := range []struct {
		state jobs.State
		fail  bool
	}{{jobs.Succeeded, false}, {jobs.Failed, true}, {jobs.Interrupted, true}} {
		for _, asJSON := range []bool{false, true} {
			var out bytes.Buffer
			a := &cli{json: asJSON, out: &out}
			j := jobs.Job{ID: "job-1", Kind: "restore", State: tc.state}
			if tc.fail {
				j.Error, j.Code = "no such restore point", "restore_point_not_found"
			}
			err := a.jobOut(j, nil)
			if (err != nil) != tc.fail {
				t.Errorf("%s, json %v: err %v, want failure %v", tc.state, asJSON, err, tc.fail)
			}
			if tc.fail && !strings.Contains(err.Error(), j.Code) {
				t.Errorf("%s: the error does not name the code: %v", tc.state, err)
			}
			if asJSON {
				var back jobs.Job
				if json.Unmarshal(out.Bytes(), &back) != nil || back.ID != j.ID || back.Code != j.Code {
					t.Errorf("%s: JSON output %q", tc.state, out.String())
				}
			} else if !strings.Contains(out.String(), "job-1") {
				t.Errorf("%s: table output %q", tc.state, out.String())
			}
		}
	}
}
