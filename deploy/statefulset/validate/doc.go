// Package validate checks the Kubernetes manifests in deploy/statefulset
// offline, against the broker binary they run.
//
// It renders the kustomization in-process (kustomize's krusty, the same
// code as `kubectl apply -k`), decodes every object strictly into the
// k8s.io/api types (an unknown field or kind is an error), and checks the
// rules that schemas cannot express: ports agree with the binary's flags
// and defaults, probes hit endpoints the binary serves, the pod runs as
// uid/gid 3003, the volume is mounted at --data-dir, and so on (Check).
// The tests then start the real binary with a pod's arguments.
//
// It is its own Go module so that the broker's go.mod does not carry the
// Kubernetes dependencies. `make k8s-validate` runs it; `make test` calls
// that.
package validate
