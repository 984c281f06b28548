#!/usr/bin/env bash
# The e2e tests that need a real node, run inside `e2e/real-node.sh run` (`make node-test`,
# `make e2e-node`): the operator's migration Jobs of tests/cutover.rs (every test named
# `…migration…`), then tests/real_node.rs (the chart's operator as pods). Both sets always run;
# the exit status is non-zero if either failed. Extra arguments go to both test binaries.
set -uo pipefail
cargo="${CARGO:-cargo}"
export USE_EXISTING_CLUSTER=true CUTOVER_E2E_REAL_NODE=1
status=0
"$cargo" test --locked -p cutover-e2e --test cutover -- migration --test-threads=2 "$@" || status=1
# The operator pods of one test must not meet another's: one test at a time.
"$cargo" test --locked -p cutover-e2e --test real_node -- --test-threads=1 "$@" || status=1
exit "$status"
