# Strict shell: a failing command in a recipe fails the target.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build
MAKEFLAGS += --no-builtin-rules

GO        ?= go
BENCH_DURATION ?= 10s
BIN       := bin/broker
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
# -race with checkptr off: raft-boltdb's boltdb/bolt v1.3.1 does pointer
# arithmetic that checkptr (enabled by -race) rejects although it is not a
# race; see replication/logstore.go.
RACE := -race -gcflags=all=-d=checkptr=0
# Every chaos campaign of make test appends its seed here (go test hides
# a passing test's log).
CHAOS_SEED_LOG := $(CURDIR)/bin/chaos-seeds.txt
# The campaign in make test replays one fixed seed, so that a CI run checks
# the code rather than rolls the dice; make chaos explores new seeds
# (random unless CHAOS_SEED is given). make test TEST_CHAOS_SEED= draws one.
TEST_CHAOS_SEED ?= 621146620
# Packages that must stay free of mochi and of each other (see STYLE.md).
PURE_PKGS := ./cluster ./replication
# The session engine's decisions (internal/session): replication's types,
# never mochi, hooks or cluster.
ENGINE_PKGS := ./internal/session
# The Kubernetes manifests' offline checks: a Go module of their own, so the
# broker's go.mod does not carry kustomize and k8s.io/api.
K8S_VALIDATE := deploy/statefulset/validate
# make image: the container image (Dockerfile). Not run in CI: no container
# engine there.
IMAGE ?= mqtt-ha/broker:$(VERSION)
CONTAINER_ENGINE ?= docker

.PHONY: build run test unit e2e large chaos chaos-pinned bench fuzz fuzz-short lint vet fmt-check tidy-check deps-check test-deps clean k8s-validate image

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/broker

## run: a local three-node cluster on 127.0.0.1 (MQTT 1883-1885); Ctrl-C stops it.
run: build
	./scripts/run-cluster.sh $(BIN)

## test: everything CI runs: static checks, then unit, in-process, e2e and short chaos tests with -race (the brokers the e2e tests start are race builds too; chaos nodes are not: mochi v2.7.9 races in its own retained index, see test/chaos/README.md), then every fuzz target for 2 s (their seeds already ran with the tests).
test: test-deps lint tidy-check
	@mkdir -p $(dir $(CHAOS_SEED_LOG)) && rm -f $(CHAOS_SEED_LOG)
	@# -p 1: one package at a time. The e2e package starts dozens of broker
	@# processes (50 MB messages, two clusters for backup and restore); run
	@# beside the in-process cluster tests on 2 cores, timing-sensitive
	@# tests of both failed in turn. About 22 minutes in all.
	CHAOS_SEED=$(TEST_CHAOS_SEED) CHAOS_SEED_LOG=$(CHAOS_SEED_LOG) E2E_RACE=1 $(GO) test $(RACE) -p 1 -count=1 -timeout 20m ./... 2>&1 | tee bin/test-output.txt \
	  || { cat $(CHAOS_SEED_LOG) 2>/dev/null; ./scripts/test-digest.sh bin/test-output.txt; exit 1; }
	@cat $(CHAOS_SEED_LOG) 2>/dev/null || echo "no chaos campaign ran (see test/chaos/README.md)"
	@# The replication package again on the other log store, raft-wal
	@# (--raft-log-store=wal): its restarts, snapshots and membership
	@# changes on that store too. About 90 s.
	REPLICATION_LOG_STORE=wal $(GO) test $(RACE) -count=1 -timeout 10m ./replication/ 2>&1 | tee bin/test-output-wal.txt \
	  || { ./scripts/test-digest.sh bin/test-output-wal.txt; exit 1; }
	$(MAKE) k8s-validate
	$(MAKE) fuzz-short

## k8s-validate: render deploy/statefulset with kustomize, decode it strictly into the k8s.io/api types, check it against a fresh build of the broker (flags, ports, probes, uid 3003, volume at --data-dir, PDB, Service mosquitto:1883), and start broker-0's command line on 127.0.0.1. In make test (with its vet, staticcheck and tidy checks in lint and tidy-check): adds about 15 s with a warm build cache, about 4 min on a cold one (measured on 2 cores: test 2m45s, vet 27s, staticcheck 40s; compiling k8s.io/api, apimachinery and kustomize is most of it). Output in bin/k8s-validate-output.txt.
k8s-validate:
	@mkdir -p bin
	cd $(K8S_VALIDATE) && $(GO) test -count=1 ./... 2>&1 | tee $(CURDIR)/bin/k8s-validate-output.txt \
	  || { $(CURDIR)/scripts/test-digest.sh $(CURDIR)/bin/k8s-validate-output.txt || true; echo "k8s-validate: the Kubernetes manifests in deploy/statefulset fail their checks (see above)"; exit 1; }

## image: the container image $(IMAGE) from the Dockerfile (needs docker, or CONTAINER_ENGINE=podman).
image:
	$(CONTAINER_ENGINE) build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

unit:
	$(GO) test $(RACE) -count=1 $$($(GO) list ./... | grep -v /test/e2e)

e2e: test-deps
	$(GO) test $(RACE) -count=1 -timeout 20m ./test/e2e/...

## chaos: the long fault campaign against three real nodes (make chaos CHAOS_DURATION=2m CHAOS_SEED=42).
CHAOS_DURATION ?= 10m
chaos:
	CHAOS_DURATION=$(CHAOS_DURATION) CHAOS_SEED=$(CHAOS_SEED) $(GO) test -count=1 -v -timeout 0 -run 'TestChaos$$' ./test/chaos/
	$(MAKE) chaos-pinned

## chaos-pinned: every pinned seed (bugs found before) for CHAOS_PINNED_DURATION each (default 2m).
CHAOS_PINNED_DURATION ?= 2m
chaos-pinned:
	CHAOS_PINNED=all CHAOS_PINNED_DURATION=$(CHAOS_PINNED_DURATION) $(GO) test -count=1 -v -timeout 0 -run TestPinnedSeeds ./test/chaos/

## bench: every benchmark in one go (Go benchmarks; the load tool against Debian's mosquitto, a standalone mochi, one node and a three-node cluster: delivery CPU and latency, fan-in, fan-out and retained writes, durable sessions, connection storm, failover time), written to BENCHMARKS.md. About 20 minutes with the default BENCH_DURATION=10s.
BENCH_CONNECTIONS ?= 10000
bench: test-deps
	./scripts/bench.sh $(BENCH_DURATION) $(BENCH_CONNECTIONS)

## large: the large-message e2e tests with a 256 MB message (make test runs them with 50 MB); about 3 GB of disk.
large: test-deps
	E2E_HUGE=1 $(GO) test -count=1 -v -timeout 30m -run 'TestLarge' ./test/e2e/

## fuzz: every native fuzz target (func FuzzXxx in a _test.go file) for FUZZTIME each, one after another (go fuzzes one target per invocation); a failing input is written to the package's testdata/fuzz/FuzzXxx, where go test then runs it as a seed. Go before 1.27 may report the end of -fuzztime itself as a failure, a bare "context deadline exceeded" with no input written (go.dev/issue/75804, a race in its coordinator under CPU contention): that one is reported and tolerated, anything else fails.
FUZZTIME ?= 30s
FUZZPARALLEL ?= 2
FUZZ_TARGETS = $(shell grep -rHo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*' . | sed -E 's|^(.*)/[^/]*:func (.*)$$|\1:\2|' | sort -u)
fuzz:
	@log=$$(mktemp); trap 'rm -f $$log' EXIT; \
	for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; name=$${t##*:}; \
	  echo "fuzz $$pkg $$name for $(FUZZTIME)"; \
	  if $(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -parallel $(FUZZPARALLEL) $$pkg >$$log 2>&1; then \
	    grep -E '^fuzz: elapsed' $$log | tail -n 2 | head -n 1; \
	  elif ! grep -q 'Failing input written' $$log && \
	       grep -A1 -- "^--- FAIL: $$name " $$log | tail -n 1 | grep -qx '    context deadline exceeded'; then \
	    echo "  tolerated: the -fuzztime deadline reported as a failure, no input found (go.dev/issue/75804)"; \
	  else \
	    cat $$log; exit 1; \
	  fi; \
	done

## fuzz-short: every fuzz target for 2 s (CI, in make test).
fuzz-short:
	$(MAKE) fuzz FUZZTIME=2s

lint: fmt-check vet deps-check
	$(GO) run $(STATICCHECK) ./...
	cd $(K8S_VALIDATE) && $(GO) run $(STATICCHECK) ./...

vet:
	$(GO) vet ./...
	cd $(K8S_VALIDATE) && $(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

tidy-check:
	@for d in . $(K8S_VALIDATE); do \
	  cp $$d/go.mod /tmp/go.mod.bak; cp $$d/go.sum /tmp/go.sum.bak; \
	  (cd $$d && $(GO) mod tidy); \
	  if ! git diff --quiet -- $$d/go.mod $$d/go.sum 2>/dev/null; then \
	    git diff -- $$d/go.mod $$d/go.sum | head -40; cp /tmp/go.mod.bak $$d/go.mod; cp /tmp/go.sum.bak $$d/go.sum; \
	    echo "$$d: go.mod/go.sum are not tidy: run 'go mod tidy' there and commit"; exit 1; fi; \
	done

# cluster and replication must not import mochi, hooks, or each other;
# internal/session not mochi, hooks or cluster.
deps-check:
	@fail=0; \
	for p in $(PURE_PKGS); do \
	  bad=$$($(GO) list -deps $$p | grep -E 'mochi-mqtt|/broker/hooks$$|/broker/(cluster|replication)$$' | grep -v "^github.com/mqtt-ha/broker/$${p#./}$$" || true); \
	  if [ -n "$$bad" ]; then echo "$$p must not import: $$bad"; fail=1; fi; \
	done; \
	for p in $(ENGINE_PKGS); do \
	  bad=$$($(GO) list -deps $$p | grep -E 'mochi-mqtt|/broker/(hooks|cluster)$$' || true); \
	  if [ -n "$$bad" ]; then echo "$$p must not import: $$bad"; fail=1; fi; \
	done; exit $$fail

# Installs what the e2e tests drive when it is missing (Debian packages).
test-deps:
	@if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_passwd >/dev/null || ! command -v mosquitto >/dev/null; then \
	  echo "installing mosquitto and mosquitto-clients"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	fi
	@# Python paho (the client Home Assistant uses): test/e2e's MQTT 5 interop test.
	@if ! /usr/bin/python3 -c 'import paho.mqtt.client' 2>/dev/null; then \
	  echo "installing python3-paho-mqtt"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-paho-mqtt >/dev/null; \
	fi
	@# Headless Chromium: test/e2e's status page test.
	@if ! command -v chromium >/dev/null; then \
	  echo "installing chromium"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi
	@# Network partitions in test/chaos need root, ip (iproute2) and nft (nftables).
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { ! command -v ip >/dev/null || ! command -v nft >/dev/null; }; then \
	  echo "installing iproute2 and nftables"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables >/dev/null; \
	fi

clean:
	rm -rf bin data
