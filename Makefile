# The targets here are exactly what CI runs (`.ci/run` calls `make test`).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
export RUST_BACKTRACE ?= 1
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)

.PHONY: test deps build fmt-check clippy crds crds-check unit control-plane demo clean-cache image e2e-node

## test: everything CI checks — formatting, clippy, generated files, unit, integration and e2e tests.
test: deps fmt-check build clippy control-plane
	$(CARGO) test --workspace --all-targets --locked

## deps: install what is missing (Debian packages: PostgreSQL server; Go and Rust must be present).
deps:
	hack/install-deps.sh

build:
	$(CARGO) build --workspace --all-targets --locked

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## crds: regenerate crds/ and the chart's copy from the Rust types.
crds:
	$(CARGO) run --quiet --locked -p cutover-operator --bin cutover -- crd > crds/databasecutover.yaml
	cp crds/databasecutover.yaml charts/cutover-operator/crds/databasecutover.yaml

## control-plane: build (once, cached per user) kube-apiserver, etcd and kubectl for the e2e tests.
control-plane:
	e2e/build-control-plane.sh >/dev/null

## demo: two PostgreSQL clusters, a local control plane, the operator, and an example plan.
demo: deps control-plane
	$(CARGO) build --locked -p cutover-operator -p cutover-e2e --bins
	$(CARGO) run --quiet --locked -p cutover-e2e --bin cutover-demo -- $(DEMO_ARGS)

## image: the operator image as a docker-archive tarball in target/image/ (no Docker daemon:
## hack/build-image.sh with crane; `ctr images import` / `docker load` it). See docs/image.md.
image:
	$(CARGO) build --release --locked -p cutover-operator --bin cutover
	hack/build-image.sh

## e2e-node: the e2e tests on a real node (root; kubelet, containerd; see e2e/README.md): the
## operator image imported, the chart installed by helm, a cutover through the operator's pod.
## Not part of `make test` yet.
e2e-node: deps image
	$(CARGO) test --locked -p cutover-e2e --test real_node --no-run
	e2e/real-node.sh run --image target/image/cutover-$(VERSION).tar -- \
		env USE_EXISTING_CLUSTER=true CUTOVER_E2E_REAL_NODE=1 \
		$(CARGO) test --locked -p cutover-e2e --test real_node -- --nocapture --test-threads=1
