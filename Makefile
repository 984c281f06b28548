# The targets here are exactly what CI runs (`.ci/run` calls `make test`).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
export RUST_BACKTRACE ?= 1

.PHONY: test deps build fmt-check clippy crds crds-check unit control-plane demo clean-cache image

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
