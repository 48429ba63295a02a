// Package valid is the one validation of the names, ids and addresses that
// reach hostd from its socket: VM names, warm-slot domain names, restore
// ids at a backup, host:port addresses, and the paths hostd derives from
// them. Every entry point (the API's handlers, the engine's methods that
// jobs and the notice watchers call too) checks with these functions before
// any file, directory, domain, memory server or job exists, and every
// path built from a name goes through Within, so that no request can name
// a file outside hostd's own directories.
//
// Its errors are errdefs codes of class Invalid (invalid_name,
// invalid_address, invalid_request), so every caller answers 400 with the
// same code and text.
package valid
