#!/usr/bin/env bash
# Builds (once per machine and version) a Go command-line tool the image build and the e2e
# tests use, from its upstream Go module at a pinned version, and prints the path of the
# binary as the LAST line of stdout. Progress goes to stderr.
#
#   hack/go-tool.sh crane     # go-containerregistry's crane: builds the operator image
#   hack/go-tool.sh helm      # helm v3: lints, renders and installs the chart
#   hack/go-tool.sh prometheus-operator-crds
#                             # the Prometheus Operator's ServiceMonitor and PrometheusRule
#                             # CRDs, as that project publishes them in its module (no build):
#                             # the folder holding them is printed instead of a binary
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
# The newest release of the operator's root module the Go module proxy serves here.
PROMETHEUS_OPERATOR_VERSION=v0.85.0

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
    prometheus-operator-crds)
        version="$PROMETHEUS_OPERATOR_VERSION"
        module="github.com/prometheus-operator/prometheus-operator"
        ;;
    *)
        log "usage: $0 crane|helm|prometheus-operator-crds"
        exit 2
        ;;
esac

dir="${XDG_CACHE_HOME:-$HOME/.cache}/cutover-e2e/${tool}-${version}"
bin="$dir/$tool"
# The CRDs: a folder of two files, marked complete by the file `.done`.
[[ "$tool" == prometheus-operator-crds ]] && bin="$dir/.done"
if [[ ! -e "$bin" ]]; then
    mkdir -p "$dir"
    exec 9>"$dir/.lock"
    if ! flock -n 9; then
        log "another build of $tool $version is running; waiting for it"
        flock 9
    fi
fi
if [[ "$tool" == prometheus-operator-crds && ! -e "$bin" ]]; then
    command -v go >/dev/null || { log "Go is needed to download $module (found no 'go' in PATH)"; exit 1; }
    # `go mod download` fetches the module's zip from the proxy and checks it against the Go
    # checksum database; its example/prometheus-operator-crd/ holds the CRDs the project releases.
    src="$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "$module@$version" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    [[ -n "$src" && -d "$src/example/prometheus-operator-crd" ]] || { log "go mod download $module@$version gave no CRDs"; exit 1; }
    for kind in servicemonitors prometheusrules; do
        install -m 0644 "$src/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$dir/"
    done
    touch "$bin"
    log "$tool: $module@$version"
fi
if [[ "$tool" == prometheus-operator-crds ]]; then
    printf '%s\n' "$dir"
    exit 0
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
