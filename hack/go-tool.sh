#!/usr/bin/env bash
# Builds (once per machine and version) a Go command-line tool the image build and the e2e
# tests use, from its upstream Go module at a pinned version, and prints the path of the
# binary as the LAST line of stdout. Progress goes to stderr.
#
#   hack/go-tool.sh crane     # go-containerregistry's crane: builds the operator image
#   hack/go-tool.sh helm      # helm v3: lints, renders and installs the chart
#
# The binaries live in the same per-user cache as the e2e control plane, keyed by version:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/cutover-e2e/<tool>-<version>/<tool>
# so fresh clones on one machine (CI) reuse them. `go install module/cmd@version` builds the
# module with its own go.mod and go.sum (checked against the Go checksum database), exactly as
# its authors pinned its dependencies. A binary already there is used without running Go.
# Concurrent runs are serialised with flock; the binary is renamed into place atomically.
set -euo pipefail

log() { printf 'go-tool: %s\n' "$*" >&2; }

# Pinned versions; the version stamps are set as the projects' own Makefiles set them.
CRANE_VERSION=v0.22.1
HELM_VERSION=v3.22.0

tool="${1:-}"
case "$tool" in
    crane)
        version="$CRANE_VERSION"
        pkg="github.com/google/go-containerregistry/cmd/crane"
        ldflags=""
        ;;
    helm)
        version="$HELM_VERSION"
        pkg="helm.sh/helm/v3/cmd/helm"
        ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
        # The default Kubernetes version of `helm template`/`lint`, derived as helm's Makefile
        # derives it from the client-go it requires (v0.37 → 1.37).
        for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
            ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=37"
        done
        ;;
    *)
        log "usage: $0 crane|helm"
        exit 2
        ;;
esac

dir="${XDG_CACHE_HOME:-$HOME/.cache}/cutover-e2e/${tool}-${version}"
bin="$dir/$tool"
if [[ ! -x "$bin" ]]; then
    mkdir -p "$dir"
    exec 9>"$dir/.lock"
    if ! flock -n 9; then
        log "another build of $tool $version is running; waiting for it"
        flock 9
    fi
fi
if [[ ! -x "$bin" ]]; then
    command -v go >/dev/null || { log "Go is needed to build $tool (found no 'go' in PATH)"; exit 1; }
    tmp="$(mktemp -d "$dir/.build.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    log "$tool: building $pkg@$version"
    start=$SECONDS
    # Run outside any module so the tool's own go.mod decides its dependencies.
    (cd "$tmp" && GOBIN="$tmp" GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
        nice -n 10 go install -trimpath -ldflags="-s -w $ldflags" "$pkg@$version") || {
        log "$tool: build failed"
        exit 1
    }
    mv -f "$tmp/$tool" "$bin"
    log "$tool: built in $((SECONDS - start))s"
fi
printf '%s\n' "$bin"
