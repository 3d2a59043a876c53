//go:build !amd64 && !arm64

package chaos

// sysSetns is unknown here: the network lab (partitions) is skipped.
const sysSetns = 0
