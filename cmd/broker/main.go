// Command broker runs a node of the clustered MQTT broker.
//
//	broker [serve] [flags]     run a node (the default)
//	broker version             print the version
//
// Every flag of serve also reads BROKER_<FLAG> from the environment.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/mqtt-ha/broker/internal/logx"
	"github.com/mqtt-ha/broker/internal/node"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// run is main without the process: it returns the exit status. 0: clean
// stop; 1: runtime failure; 2: bad command line or configuration.
func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "serve":
		return serve(args, getenv, stderr)
	case "cluster":
		return clusterCmd(args, getenv, stdout, stderr)
	case "sessions":
		return sessionsCmd(args, getenv, stdout, stderr)
	case "clients":
		return clientsCmd(args, getenv, stdout, stderr)
	case "retained":
		return retainedCmd(args, getenv, stdout, stderr)
	case "subscriptions":
		return subscriptionsCmd(args, getenv, stdout, stderr)
	case "backup":
		return backupCmd(args, getenv, stdout, stderr)
	case "restore":
		return restoreCmd(args, getenv, stdout, stderr)
	case "import-mosquitto":
		return importCmd(args, getenv, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "broker", version)
		return 0
	case "help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "broker: unknown command %q\n\n%s", cmd, usage)
	return 2
}

const usage = `Usage:
  broker [serve] [flags]   run a broker node (the default; 'broker serve -h' lists the flags)
  broker cluster status    show the cluster as a running node sees it (--http-addr)
  broker cluster remove-node ID
                           remove a dead node from the raft configuration
                           (--admin-token-file when the node has a token)
  broker sessions          list the sessions a running node holds (--http-addr)
  broker sessions show ID  one session with its subscriptions and queue
  broker sessions delete ID
                           delete an offline persistent session (admin)
  broker clients [--all]   list the clients connected to a node (--http-addr),
                           or to every node
  broker clients disconnect ID
                           close a client's connection (admin)
  broker retained          list retained messages (--filter, every page)
  broker backup --out FILE a consistent, checksummed copy of the cluster's
                           replicated state (admin)
  broker restore --in FILE seed a cluster from a backup (ask the leader;
                           refused where state exists unless --force; admin)
  broker import-mosquitto --db mosquitto.db
                           load a Mosquitto 2.x persistence file's retained
                           messages and persistent sessions (admin)
  broker subscriptions FILTER
                           the nodes that route a topic filter
  broker retained delete TOPIC
                           delete a retained message, cluster-wide (admin)
  broker cluster transfer-leadership
                           hand raft leadership to another voter (ask the
                           leader; admin)
  broker version           print the version
`

func serve(args []string, getenv func(string) string, stderr io.Writer) int {
	o, err := parseServe(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err == nil {
		err = o.loadConfigFile()
	}
	if err == nil {
		err = o.validate()
	}
	if err != nil {
		fmt.Fprintf(stderr, "broker: configuration error: %v\n", err)
		return 2
	}
	log, err := logx.New(stderr, o.logFormat, o.logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "broker: configuration error: %v\n", &usageError{source: "flag --log-format/--log-level", msg: err.Error()})
		return 2
	}
	for _, w := range o.warnings {
		log.Warn("config directive ignored", "where", w.where, "reason", w.msg)
	}
	if o.insecureCluster && o.cfg.ClusterKey == "" {
		log.Warn("cluster port and gossip are unauthenticated (--insecure-cluster): anyone who can reach them can join the cluster, rewrite its state and inject messages; set --cluster-key-file",
			"gossip_addr", o.cfg.GossipAddr, "cluster_addr", o.cfg.ClusterAddr)
	}
	o.cfg.Logger = log
	o.cfg.Version = version
	n, err := node.New(o.cfg)
	if err != nil {
		log.Error("cannot start node", "error", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := n.Start(ctx); err != nil {
		log.Error("cannot start node", "error", err)
		return 1
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	for {
		select {
		case <-hup:
			if err := n.Reload(); err != nil {
				log.Error("reload failed; previous settings stay in force", "error", err)
			} else {
				log.Info("reloaded password, ACL and TLS files")
			}
			continue
		case <-ctx.Done():
		}
		break
	}
	log.Info("signal received, stopping", "timeout", o.cfg.ShutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), o.cfg.ShutdownTimeout)
	defer cancel()
	if err := n.Shutdown(sctx); err != nil {
		log.Error("graceful shutdown incomplete", "error", err)
		return 1
	}
	log.Info("stopped")
	return 0
}
