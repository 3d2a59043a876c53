package node

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"sync/atomic"
)

// certReloader serves a TLS certificate from an atomic pointer, so SIGHUP
// can rotate a renewed certificate (cert-manager) without a restart. It
// backs the MQTT TLS listener and the cluster port's mutual TLS.
type certReloader struct {
	certFile, keyFile string
	flags             string // "--tls-cert / --tls-key": named in errors
	cert              atomic.Pointer[tls.Certificate]
	cas               *x509.CertPool // nil: no client certificates asked for
}

// newCertReloader loads certFile and keyFile and, when caFile is set, the
// CA bundle that must have signed the peer's certificate. certFlag, keyFlag
// and caFlag name the flags in errors.
func newCertReloader(certFile, keyFile, caFile, certFlag, keyFlag, caFlag string) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, flags: certFlag + " / " + keyFlag}
	if err := r.reload(); err != nil {
		return nil, err
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", caFlag, err)
		}
		r.cas = x509.NewCertPool()
		if !r.cas.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s %s: no PEM certificate found", caFlag, caFile)
		}
	}
	return r, nil
}

func (r *certReloader) reload() error {
	c, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return fmt.Errorf("%s (%s, %s): %w", r.flags, r.certFile, r.keyFile, err)
	}
	r.cert.Store(&c)
	return nil
}

// config is the server side: the certificate, and client certificates
// required and verified when a CA was given.
func (r *certReloader) config() *tls.Config {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return r.cert.Load(), nil
		},
	}
	if r.cas != nil {
		cfg.ClientCAs = r.cas
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg
}

// clientConfig is the dialing side of mutual TLS between nodes: it
// presents the same certificate and trusts only the CA.
func (r *certReloader) clientConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    r.cas,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return r.cert.Load(), nil
		},
	}
}
