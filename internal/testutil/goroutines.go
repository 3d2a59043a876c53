package testutil

import (
	"fmt"
	"runtime"
	"sort"
	"strings"
)

// Goroutines summarises every goroutine of the process for a hang report:
// goroutines with the same stack are counted once, and each stack is
// shown by its frames in this module or in hashicorp/raft (the rest is
// the runtime and the standard library). The result is short enough for
// a test failure message, which is often the only part of a CI log that
// a reader sees; a full dump of thousands of goroutines is not.
func Goroutines() string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	counts := map[string]int{}
	for _, g := range strings.Split(string(buf), "\n\n") {
		if sig := signature(g); sig != "" {
			counts[sig]++
		}
	}
	sigs := make([]string, 0, len(counts))
	for s := range counts {
		sigs = append(sigs, s)
	}
	sort.Slice(sigs, func(i, j int) bool {
		if counts[sigs[i]] != counts[sigs[j]] {
			return counts[sigs[i]] > counts[sigs[j]]
		}
		return sigs[i] < sigs[j]
	})
	var b strings.Builder
	for i, s := range sigs {
		if i == 40 {
			fmt.Fprintf(&b, "... and %d more stacks\n", len(sigs)-i)
			break
		}
		fmt.Fprintf(&b, "%d x %s\n", counts[s], s)
	}
	return b.String()
}

// signature reduces one goroutine of a runtime.Stack dump to its state
// and its interesting frames ("" when it has none).
func signature(g string) string {
	lines := strings.Split(strings.TrimSpace(g), "\n")
	if len(lines) < 3 || !strings.HasPrefix(lines[0], "goroutine ") {
		return ""
	}
	state := lines[0]
	if i := strings.IndexByte(state, '['); i >= 0 {
		state = strings.TrimSuffix(state[i:], ":")
		if j := strings.IndexByte(state, ','); j >= 0 {
			state = state[:j] + "]" // drop the wait time: same stacks group
		}
	}
	var frames []string
	for i := 1; i+1 < len(lines); i += 2 {
		fn, file := lines[i], strings.TrimSpace(lines[i+1])
		if !strings.Contains(fn, "mqtt-ha/broker") && !strings.Contains(fn, "hashicorp/raft") {
			continue
		}
		if k := strings.Index(fn, " in goroutine "); k > 0 {
			fn = fn[:k] // "created by F in goroutine N": N differs per goroutine
		}
		if k := strings.LastIndexByte(fn, '('); k > 0 && strings.HasSuffix(fn, ")") {
			fn = fn[:k]
		}
		fn = fn[strings.LastIndexByte(fn, '/')+1:]
		if k := strings.Index(file, " +0x"); k >= 0 {
			file = file[:k]
		}
		file = file[strings.LastIndexByte(file, '/')+1:]
		frames = append(frames, fn+" ("+file+")")
	}
	if len(frames) == 0 {
		return ""
	}
	if len(frames) > 6 {
		frames = frames[:6]
	}
	return state + " " + strings.Join(frames, " < ")
}
