package validate

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Manifests is the rendered kustomization, by kind.
type Manifests struct {
	StatefulSets []*appsv1.StatefulSet
	Services     map[string]*corev1.Service // by name
	PDBs         []*policyv1.PodDisruptionBudget
	ConfigMaps   map[string]*corev1.ConfigMap // by name (with kustomize's hash suffix)
	Secrets      map[string]*corev1.Secret
}

// Render runs `kustomize build dir` on fsys.
func Render(fsys filesys.FileSystem, dir string) ([]byte, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(fsys, dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	return m.AsYaml()
}

// Decode reads a multi-document YAML stream strictly: every document must
// be a kind of apps/v1, v1 or policy/v1, and carry no unknown or duplicate
// field (what the API server's strict field validation refuses).
func Decode(data []byte) (*Manifests, error) {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{appsv1.AddToScheme, corev1.AddToScheme, policyv1.AddToScheme} {
		if err := add(s); err != nil {
			return nil, err
		}
	}
	dec := serializer.NewCodecFactory(s, serializer.EnableStrict).UniversalDeserializer()
	m := &Manifests{Services: map[string]*corev1.Service{}, ConfigMaps: map[string]*corev1.ConfigMap{}, Secrets: map[string]*corev1.Secret{}}
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var errs []error
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		obj, gvk, err := dec.Decode(doc, nil, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("document %d: %w", i, err))
			continue
		}
		switch o := obj.(type) {
		case *appsv1.StatefulSet:
			m.StatefulSets = append(m.StatefulSets, o)
		case *corev1.Service:
			m.Services[o.Name] = o
		case *policyv1.PodDisruptionBudget:
			m.PDBs = append(m.PDBs, o)
		case *corev1.ConfigMap:
			m.ConfigMaps[o.Name] = o
		case *corev1.Secret:
			m.Secrets[o.Name] = o
		default:
			errs = append(errs, fmt.Errorf("document %d: unexpected kind %s", i, gvk))
		}
	}
	return m, errors.Join(errs...)
}
