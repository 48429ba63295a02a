package notice

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// EC2 watches for spot interruptions through IMDSv2: a session token from
// PUT /latest/api/token, then GET /latest/meta-data/spot/instance-action,
// which is 404 until the instance is to be interrupted and then
// {"action": "terminate|stop|hibernate", "time": "2017-09-18T08:22:00Z"}.
// Rebalance recommendations are not watched: they are a hint, not a
// deadline, and hostd must not evacuate on a hint.
type EC2 struct {
	Endpoint
	// TokenTTL is the lifetime asked for session tokens (1 s to 6 h);
	// DefaultTokenTTL if zero. The token is renewed before it expires and
	// whenever the server answers 401.
	TokenTTL time.Duration
}

// DefaultTokenTTL is IMDSv2's longest token lifetime: one token request per
// six hours.
const DefaultTokenTTL = 6 * time.Hour

// IMDSv2 protocol strings.
const (
	ec2TokenPath      = "/latest/api/token"
	ec2ActionPath     = "/latest/meta-data/spot/instance-action"
	ec2TokenHeader    = "X-aws-ec2-metadata-token"
	ec2TokenTTLHeader = "X-aws-ec2-metadata-token-ttl-seconds"
	// maxTokenLen: real tokens are 56 bytes; anything far longer is not one.
	maxTokenLen = 1024
)

// Run polls until ctx ends, calling onNotice once per distinct interruption
// notice. It returns an error only for an invalid configuration, at once.
func (w *EC2) Run(ctx context.Context, onNotice func(Notice)) error {
	e, err := w.Endpoint.resolve(EC2Provider, EC2Interval, EC2Warning)
	if err != nil {
		return err
	}
	ttl := w.TokenTTL
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < time.Second || ttl > DefaultTokenTTL {
		return fmt.Errorf("ec2 watcher: token TTL %v is outside IMDSv2's 1s to 6h", ttl)
	}
	s := &ec2Session{e: e, ttl: ttl.Truncate(time.Second)}
	e.run(ctx, s.poll, onNotice, nil)
	return nil
}

// ec2Session is one Run's token and its expiry.
type ec2Session struct {
	e       endpoint
	ttl     time.Duration
	token   string
	renewAt time.Time
}

func (s *ec2Session) poll(ctx context.Context) ([]Notice, time.Duration, error) {
	// A 401 means the token expired early or IMDS restarted: renew it and
	// ask once more in the same poll, so a notice is not delayed by it.
	for attempt := 1; ; attempt++ {
		if s.token == "" || time.Now().After(s.renewAt) {
			if err := s.renew(ctx); err != nil {
				return nil, 0, err
			}
		}
		a, err := s.e.call(ctx, http.MethodGet, ec2ActionPath, map[string]string{ec2TokenHeader: s.token}, nil, 0)
		if err != nil {
			return nil, 0, err
		}
		received := time.Now()
		switch a.status {
		case http.StatusNotFound:
			return nil, 0, nil
		case http.StatusOK:
			action, deadline, err := parseEC2InstanceAction(a.body)
			if err != nil {
				return nil, 0, fmt.Errorf("GET %s: %w", ec2ActionPath, err)
			}
			return []Notice{{
				Provider: EC2Provider,
				ID:       action + "@" + deadline.Format(time.RFC3339),
				Action:   action,
				Deadline: deadline,
				Received: received,
				Detail:   fmt.Sprintf("spot instance-action %s at %s", action, deadline.Format(time.RFC3339)),
			}}, 0, nil
		case http.StatusUnauthorized:
			s.token = ""
			if attempt < 2 {
				continue
			}
			return nil, 0, fmt.Errorf("GET %s: a freshly issued IMDSv2 token was rejected (401)", ec2ActionPath)
		default:
			return nil, 0, unexpected(http.MethodGet, ec2ActionPath, a)
		}
	}
}

// renew fetches a session token, to be renewed a tenth of its life (at
// most a minute) before it expires.
func (s *ec2Session) renew(ctx context.Context) error {
	hdr := map[string]string{ec2TokenTTLHeader: strconv.Itoa(int(s.ttl / time.Second))}
	a, err := s.e.call(ctx, http.MethodPut, ec2TokenPath, hdr, nil, 0)
	if err != nil {
		return fmt.Errorf("get IMDSv2 token: %w", err)
	}
	if a.status != http.StatusOK {
		return fmt.Errorf("get IMDSv2 token: %w", unexpected(http.MethodPut, ec2TokenPath, a))
	}
	tok, err := parseEC2Token(a.body)
	if err != nil {
		return fmt.Errorf("get IMDSv2 token: %w", err)
	}
	s.token = tok
	s.renewAt = time.Now().Add(s.ttl - min(s.ttl/10, time.Minute))
	return nil
}

// parseEC2Token accepts a token of printable ASCII without spaces: it goes
// into a header, where anything else could not be sent.
func parseEC2Token(b []byte) (string, error) {
	if len(b) == 0 {
		return "", errors.New("empty IMDSv2 token")
	}
	if len(b) > maxTokenLen {
		return "", fmt.Errorf("IMDSv2 token of %d bytes is longer than %d", len(b), maxTokenLen)
	}
	for _, c := range b {
		if c <= ' ' || c > '~' {
			return "", fmt.Errorf("IMDSv2 token holds byte %#x, which is not printable ASCII", c)
		}
	}
	return string(b), nil
}

// ec2InstanceAction is the body of spot/instance-action.
type ec2InstanceAction struct {
	Action string `json:"action"`
	Time   string `json:"time"`
}

// maxActionLen bounds an action name; the documented ones are short words.
const maxActionLen = 32

// parseEC2InstanceAction reads a spot/instance-action body. Both fields are
// required; the time must be RFC 3339. Fields EC2 may add later are
// ignored. An action other than the documented terminate, stop and
// hibernate is still accepted if it is a plain lower-case word: whatever
// EC2 calls it, the instance is being interrupted, and missing a real
// notice costs far more than evacuating on a new kind of one.
func parseEC2InstanceAction(b []byte) (action string, deadline time.Time, err error) {
	var v ec2InstanceAction
	if err := decodeStrict(b, &v); err != nil {
		return "", time.Time{}, fmt.Errorf("parse spot instance-action: %w", err)
	}
	if v.Action == "" || len(v.Action) > maxActionLen {
		return "", time.Time{}, fmt.Errorf("parse spot instance-action: action of %d bytes is empty or longer than %d", len(v.Action), maxActionLen)
	}
	for _, c := range v.Action {
		if c < 'a' || c > 'z' {
			return "", time.Time{}, fmt.Errorf("parse spot instance-action: action %q is not a lower-case word", v.Action)
		}
	}
	t, err := time.Parse(time.RFC3339, v.Time)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("parse spot instance-action: time: %w", err)
	}
	if t.IsZero() {
		// The zero time means "no deadline" everywhere in Go.
		return "", time.Time{}, fmt.Errorf("parse spot instance-action: time %s is the zero time", v.Time)
	}
	return v.Action, t.UTC(), nil
}
