// Package config reads hostd's one configuration file (TOML). Every key has
// a default, documented in hostd.toml beside this file; a missing file means
// all defaults. Validation happens here, once, so the rest of the daemon can
// trust the values it is handed.
package config
