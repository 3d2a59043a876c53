// Command mochi-baseline is a standalone mochi broker: the mochi version
// this project embeds, every client allowed, one TCP listener, nothing
// else. The benchmarks measure the cluster against it (and against
// Debian's mosquitto) in the same run: scripts/bench-delivery.sh.
//
//	mochi-baseline --addr 127.0.0.1:21884
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// allowAll lets every client connect and use every topic (mochi's own
// auth.AllowHook would bring in a YAML dependency for nothing).
type allowAll struct{ mqtt.HookBase }

func (allowAll) ID() string { return "allow-all" }
func (allowAll) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (allowAll) OnACLCheck(*mqtt.Client, string, bool) bool              { return true }

func main() {
	addr := flag.String("addr", "127.0.0.1:1883", "MQTT listener address")
	flag.Parse()
	if err := run(*addr); err != nil {
		fmt.Fprintf(os.Stderr, "mochi-baseline: %v\n", err)
		os.Exit(1)
	}
}

func run(addr string) error {
	s := mqtt.New(&mqtt.Options{Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err := s.AddHook(new(allowAll), nil); err != nil {
		return err
	}
	if err := s.AddListener(listeners.NewTCP(listeners.Config{ID: "tcp", Address: addr})); err != nil {
		return err
	}
	if err := s.Serve(); err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	return s.Close()
}
