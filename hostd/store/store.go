package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// ErrNotFound is returned for a key that is not in its bucket.
var ErrNotFound = errors.New("not in store")

// Bucket names. Each is created on Open.
const (
	BucketVMs        = "vms"
	BucketJobs       = "jobs"
	BucketConnectors = "connectors"
	BucketProtection = "protection"
	BucketSwap       = "swap"
)

var buckets = []string{BucketVMs, BucketJobs, BucketConnectors, BucketProtection, BucketSwap}

// Store is the open state file.
type Store struct {
	db *bolt.DB
}

// Open opens (or creates) dir/hostd.db. It fails after timeout if another
// process holds the file: two daemons must never share a state directory.
func Open(dir string, timeout time.Duration) (*Store, error) {
	path := filepath.Join(dir, "hostd.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: locked by another process (is another hostd running on this state_dir?)", path)
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range buckets {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: create buckets: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close flushes and closes the file.
func (s *Store) Close() error { return s.db.Close() }

// Put stores v under key in bucket, replacing any previous value.
func Put[T any](s *Store, bucket, key string, v T) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("store put %s/%s: encode: %w", bucket, key, err)
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucket)).Put([]byte(key), data)
	})
	if err != nil {
		return fmt.Errorf("store put %s/%s: %w", bucket, key, err)
	}
	return nil
}

// Has says whether bucket holds key (another package's record, which a
// caller checks without decoding it).
func (s *Store) Has(bucket, key string) bool {
	found := false
	_ = s.db.View(func(tx *bolt.Tx) error {
		found = tx.Bucket([]byte(bucket)).Get([]byte(key)) != nil
		return nil
	})
	return found
}

// Get loads the value under key, or ErrNotFound.
func Get[T any](s *Store, bucket, key string) (T, error) {
	var v T
	err := s.db.View(func(tx *bolt.Tx) error {
		data := tx.Bucket([]byte(bucket)).Get([]byte(key))
		if data == nil {
			return ErrNotFound
		}
		return json.Unmarshal(data, &v)
	})
	if err != nil {
		return v, fmt.Errorf("store get %s/%s: %w", bucket, key, err)
	}
	return v, nil
}

// Delete removes key; deleting a missing key is not an error.
func (s *Store) Delete(bucket, key string) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucket)).Delete([]byte(key))
	})
	if err != nil {
		return fmt.Errorf("store delete %s/%s: %w", bucket, key, err)
	}
	return nil
}

// List returns every value in bucket, in key order.
func List[T any](s *Store, bucket string) ([]T, error) {
	var out []T
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucket)).ForEach(func(k, data []byte) error {
			var v T
			if err := json.Unmarshal(data, &v); err != nil {
				return fmt.Errorf("decode %s: %w", k, err)
			}
			out = append(out, v)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("store list %s: %w", bucket, err)
	}
	return out, nil
}
