// Package errdefs is hostd's error vocabulary: a handful of classes
// (invalid, forbidden, not found, conflict, not implemented, unavailable,
// peer failure), each with one HTTP status, and coded errors that belong to
// a class and carry a stable machine-readable code for the API's JSON
// errors and for failed jobs.
//
// Every package that returns errors a caller can act on declares them with
// New and wraps them with %w; the API maps any error to its answer with
// HTTP, without knowing the packages that made it (containerd's errdefs is
// the model). The text that says what to do stays in the messages.
//
// It is a leaf: it imports only the standard library, so drivers (xen),
// the dataplane and the engine can all use it.
package errdefs
