# natsmesh developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /usr/bin/env bash
VENV ?= .venv
BIN := $(VENV)/bin
# The slowest tests of each tier are printed: CI's time budget is watched there.
PYTEST := $(BIN)/pytest -p no:cacheprovider --durations=12 --durations-min=3

.PHONY: help venv tools cluster-up cluster-down demo demo-down test check crds \
        test-unit test-unit-halves test-unit-a test-unit-b test-local test-integration test-integration-a test-integration-b test-security test-security-a test-security-b test-change test-e2e e2e-local e2e-kind bench bench-quick \
        clean images docker-down kind-tools kind-image kind-up kind-down demo-kind demo-kind-down

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

venv: ## create .venv from the hashed lock files
	@hack/venv.sh

tools: ## build kube-apiserver & co, etcd, kwok, helm, nats CLI into ~/.cache/natsmesh
	@hack/tools.sh

images: ## build the sidecar, operator and demo-app images (Docker from Debian, no registry)
	@hack/images.sh

docker-down: ## stop the dockerd that hack/docker.sh started (not one it found running)
	@hack/docker.sh down

kind-tools: ## build kubelet/kubeadm/kube-proxy, kind, containerd, runc, CNI, CoreDNS, pause, nats-server
	@hack/kind-tools.sh

kind-image: tools kind-tools ## build the kind node image offline (component images from kubeadm's list)
	@hack/kind.sh image

kind-up: venv tools kind-tools ## a two-node kind cluster with real kubelets, natsmesh's images loaded
	@hack/kind.sh up

kind-down: ## delete the kind cluster (dockerd stays up; `make docker-down` stops the one we started)
	@hack/kind.sh down

cluster-up: tools ## start the local control plane (kwok, two fake nodes)
	@hack/cluster.sh up

cluster-down: ## stop the local control plane and remove its state
	@hack/cluster.sh down

demo: venv tools ## the 5-minute demo on the local control plane
	@hack/demo.sh up

demo-down: ## remove everything the demo started
	@hack/demo.sh down

demo-kind: venv tools kind-tools ## the same demo on kind (real kubelets, NetworkPolicies enforced)
	@hack/demo.sh kind-up

demo-kind-down: ## delete the demo's kind cluster
	@hack/demo.sh kind-down

# mypy's cache outlives the clone (a fresh clone's full check is ~19 CPU-s, a
# cached one ~1 s), keyed by the locks that pin mypy, its plugins and the
# typed dependencies. Safe to share: mypy re-checks a file whose hash differs
# from the cached one, and what depends on it.
MYPY_CACHE = $(or $(NATSMESH_CACHE),$(HOME)/.cache/natsmesh)/mypy-$(shell cat requirements/dev.txt pyproject.toml | sha256sum | cut -c1-12)

check: venv ## lint, format, types, CRD freshness
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --cache-dir "$(MYPY_CACHE)"
	$(BIN)/natsmesh crds --check
	$(BIN)/natsmesh crds --check --dir charts/natsmesh/files/crds --no-docs

crds: venv ## regenerate crds/, the chart's copy and docs/resources.md from the api models
	$(BIN)/natsmesh crds
	$(BIN)/natsmesh crds --dir charts/natsmesh/files/crds --no-docs

test: venv tools ## everything CI runs: checks and unit tier, the local tiers on one local cluster, then real pods on kind
	@# lint/types and the unit tier in two halves: three CPU-bound processes on two cores.
	$(MAKE) --no-print-directory -j3 --output-sync=target check test-unit-halves
	@# What the kind tier needs is built beside the local tiers (nice'd; cache hits when warm).
	hack/with-docker.sh hack/kind-ahead.sh $(MAKE) --no-print-directory test-local e2e-kind

# One tier after another: side by side on two cores (tiers, or pytest-xdist
# workers sharing a cluster) the timing-bound tests stop being reliable
# (docs/architecture.md, "CI, cold and warm"). The integration and security
# tiers, which wait on one test's round trips at a time and left a core idle,
# run in two halves each (below).
test-local: venv tools ## the server tiers on one local control plane (integration, security, change, e2e)
	hack/with-cluster.sh $(MAKE) --no-print-directory test-integration test-security test-change test-e2e

# A tier in two halves: two pytest processes, each on a local control plane of
# its own (no cluster-scoped object of one half meets the other's: webhooks,
# CRDs, ClusterRoles), picking its tests' ports from its own slice
# (tests/fixtures/ports.py). The first half takes the cluster it is given.
HALF_A = NATSMESH_PORT_SLICE=0/2 hack/with-cluster.sh
HALF_B = env -u NATSMESH_KUBECONFIG NATSMESH_PORT_SLICE=1/2 \
           NATSMESH_TEST_CLUSTER=$${NATSMESH_TEST_CLUSTER:-natsmesh-test}-b hack/with-cluster.sh
HALVES = $(MAKE) --no-print-directory -j2 --output-sync=target

test-unit: venv ## fast tier: pure logic, no servers (< 1 min)
	$(PYTEST) tests/unit

# The unit tier as two processes of about equal length (for `make test`):
# the chart's tests (helm template runs) and a few small folders, and every
# other folder (a new one lands there by itself).
UNIT_A := $(addprefix tests/unit/,chart api stream tap usercli)
UNIT_B := $(filter-out $(UNIT_A) tests/unit/__pycache__,$(patsubst %/,%,$(wildcard tests/unit/*/))) \
          $(wildcard tests/unit/test_*.py)
test-unit-halves: test-unit-a test-unit-b
test-unit-a: venv
	$(PYTEST) $(UNIT_A)
test-unit-b: venv
	$(PYTEST) $(UNIT_B)

test-integration: venv tools ## real nats-server and real kube-apiserver
	hack/with-docker.sh $(HALVES) test-integration-a test-integration-b

# Halves of about equal length (a new folder lands in the second by itself).
INTEGRATION_A := $(addprefix tests/integration/,sidecar grpc usercli api foundation bench tracing)
INTEGRATION_B := $(filter-out $(INTEGRATION_A) tests/integration/__pycache__,$(patsubst %/,%,$(wildcard tests/integration/*/))) \
                 $(wildcard tests/integration/test_*.py)
test-integration-a: venv tools
	$(HALF_A) $(PYTEST) $(INTEGRATION_A)
test-integration-b: venv tools
	$(HALF_B) $(PYTEST) $(INTEGRATION_B)

test-security: venv tools ## each known attack against real servers: it fails, the legitimate call beside it works
	$(HALVES) test-security-a test-security-b

SECURITY_A := $(addprefix tests/security/test_security_,secrets.py lifecycle.py callee.py dedup.py events.py memory.py monitoring.py replies.py)
SECURITY_B := $(filter-out $(SECURITY_A),$(wildcard tests/security/test_*.py))
test-security-a: venv tools
	$(HALF_A) $(PYTEST) $(SECURITY_A)
test-security-b: venv tools
	$(HALF_B) $(PYTEST) $(SECURITY_B)

test-change: venv tools ## continuous traffic through two hops while the mesh changes: 0 failed, 0 lost
	hack/with-cluster.sh $(PYTEST) -s tests/change

test-e2e e2e-local: venv tools ## the whole flow on the local control plane
	hack/with-cluster.sh $(PYTEST) -m "not kind" tests/e2e

e2e-kind: venv tools kind-tools ## the whole flow on kind with real pods (Docker from Debian; builds the node image offline)
	NATSMESH_E2E_KIND=1 hack/with-docker.sh $(PYTEST) tests/e2e/test_e2e_kind.py

bench: venv tools ## benchmarks (not timed tests): sidecar, gRPC, namespace scale and operator
	$(BIN)/python -m bench.sidecar
	$(BIN)/python -m bench.grpc
	$(BIN)/python -m bench.namespace_scale
	hack/with-cluster.sh $(BIN)/python -m bench.operator_scale

bench-quick: venv tools ## the benchmarks with tiny counts (CI runs these via tests/integration/bench)
	$(BIN)/python -m bench.sidecar --quick
	$(BIN)/python -m bench.grpc --quick
	$(BIN)/python -m bench.namespace_scale --quick
	hack/with-cluster.sh $(BIN)/python -m bench.operator_scale --quick

clean: ## remove local state (not the tool cache)
	rm -rf .work .mypy_cache .ruff_cache .pytest_cache
