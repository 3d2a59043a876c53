package node

import (
	"context"
	"fmt"
	"net"
	"strconv"

	"github.com/mqtt-ha/broker/cluster"
)

func (n *Node) newCluster() error {
	mqttPort := 0
	if a := n.Addr("mqtt"); a != "" {
		if _, p, err := net.SplitHostPort(a); err == nil {
			mqttPort, _ = strconv.Atoi(p)
		}
	}
	cfg := cluster.Config{
		NodeID:        n.cfg.NodeID,
		AdvertiseHost: n.cfg.AdvertiseHost,
		GossipAddr:    n.cfg.GossipAddr,
		ClusterAddr:   n.cfg.ClusterAddr,
		MQTTPort:      mqttPort,
		Join:          n.cfg.Join,
		Logger:        n.cfg.Logger, // the cluster adds its own node attribute
		Registerer:    n.reg,
	}
	cfg.AppMeta = encodeAppMeta(n.cfg.BootstrapExpect, n.initialHasState)
	if srv := n.cfg.DNSServer; srv != "" {
		cfg.Resolver = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, srv)
		}}
	}
	if n.cfg.ClusterKey != "" {
		cfg.ClusterKey = []byte(n.cfg.ClusterKey)
		for _, k := range n.cfg.ClusterAcceptedKeys {
			cfg.AcceptedKeys = append(cfg.AcceptedKeys, []byte(k))
		}
	}
	if n.cfg.ClusterTLSCert != "" {
		r, err := newCertReloader(n.cfg.ClusterTLSCert, n.cfg.ClusterTLSKey, n.cfg.ClusterTLSCA,
			"--cluster-tls-cert", "--cluster-tls-key", "--cluster-tls-ca")
		if err != nil {
			return fmt.Errorf("cluster: %w", err)
		}
		n.clusterTLS = r
		cfg.TLSServer, cfg.TLSClient = r.config(), r.clientConfig()
	}
	if n.cfg.ClusterTuning != nil {
		n.cfg.ClusterTuning(&cfg)
	}
	cn, err := cluster.New(cfg, n.clusterHook)
	if err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	n.cluster = cn
	n.clusterHook.SetNode(cn)
	return nil
}
