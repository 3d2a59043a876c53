//go:build !chaos_broken

package hooks

// ackBeforeCommit is the deliberately broken behaviour the chaos suite uses
// to prove its checker can fail (build tag chaos_broken). Never set in a
// normal build.
const ackBeforeCommit = false
