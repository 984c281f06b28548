#!/usr/bin/env bash
# Builds the operator image without a Docker daemon and writes it as a docker-archive tarball
# (manifest.json + config + one layer) that `docker load`, `ctr images import` and
# `podman load` accept. `make image` runs it after `cargo build --release`.
#
#   hack/build-image.sh [--binary PATH] [--output FILE] [--tag REF] [--name NAME]
#
# Defaults: the release `cutover` binary of this workspace's target directory, the tarball
# target/image/cutover-<version>.tar, the tag ghcr.io/dbops/cutover:<workspace version> (the
# image the chart and the operator's migration Jobs name by default). --name installs the binary
# as /usr/local/bin/NAME, the entrypoint (the e2e bed builds its pause and workload images so).
#
# The one layer is the root filesystem hack/image-rootfs.sh lays out (the Dockerfile uses the
# same script): the binary at /usr/local/bin/cutover, the shared libraries `ldd` lists at their
# paths, CA certificates, a `cutover` user 65532. The config: entrypoint /usr/local/bin/cutover,
# user 65532:65532 (numeric, so the kubelet can check runAsNonRoot), linux/amd64.
#
# The image is assembled by go-containerregistry's crane (hack/go-tool.sh builds it): crane
# appends the layer to an empty base and sets the config, which it does against a registry, so
# the script runs crane's own in-memory registry on a free loopback port for the two steps and
# stops it at the end. Nothing leaves the machine. The layer tarball is written with sorted
# names, fixed times and numeric owners, and crane stamps no build time, so the same binary
# gives the same image digest.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
log() { printf 'build-image: %s\n' "$*" >&2; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
binary="$target_dir/release/cutover"
output=""
tag="ghcr.io/dbops/cutover:$version"
name=cutover

while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --output) output="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --name) name="$2"; shift 2 ;;
        *) log "unknown argument $1"; exit 2 ;;
    esac
done
[[ -n "$output" ]] || output="$root/target/image/cutover-$version.tar"
[[ -x "$binary" ]] || { log "no binary at $binary (run: cargo build --release -p cutover-operator --bin cutover)"; exit 1; }

crane="$("$here/go-tool.sh" crane | tail -n1)"

work="$(mktemp -d "${TMPDIR:-/tmp}/cutover-image.XXXXXX")"
registry_pid=""
cleanup() {
    if [[ -n "$registry_pid" ]]; then
        kill "$registry_pid" 2>/dev/null || true
        wait "$registry_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

rootfs="$work/rootfs"
"$here/image-rootfs.sh" "$binary" "$rootfs" "$name"

layer="$work/layer.tar"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$layer" .

# --- the image, through crane's registry on loopback --------------------------------------
# Port 0 on loopback: the kernel picks a free port, which crane logs ("serving on port N").
# The log exists before the background process opens it, so the first read cannot miss it.
: >"$work/registry.log"
"$crane" registry serve --address 127.0.0.1:0 >>"$work/registry.log" 2>&1 &
registry_pid=$!
port=""
deadline=$((SECONDS + 30))
while [[ -z "$port" ]]; do
    port="$(sed -n 's/.*serving on port \([0-9][0-9]*\).*/\1/p' "$work/registry.log" | head -n1)"
    [[ -n "$port" ]] && break
    if ! kill -0 "$registry_pid" 2>/dev/null || ((SECONDS >= deadline)); then
        log "crane's registry did not start on loopback"
        cat "$work/registry.log" >&2
        exit 1
    fi
    sleep 0.1
done

staging="127.0.0.1:$port/cutover:build"
# crane logs every blob it pushes; keep that for a failure only.
"$crane" append --oci-empty-base --new_layer "$layer" --new_tag "$staging" >/dev/null 2>"$work/crane.log" ||
    { cat "$work/crane.log" >&2; log "crane append failed"; exit 1; }
mkdir -p "$(dirname "$output")"
"$crane" mutate "$staging" \
    --set-platform linux/amd64 \
    --entrypoint "/usr/local/bin/$name" \
    --user 65532:65532 \
    --workdir / \
    --env PATH=/usr/local/bin:/usr/bin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label "org.opencontainers.image.title=$name" \
    --label "org.opencontainers.image.version=$version" \
    --tag "$tag" \
    --output "$output.tmp" 2>"$work/crane.log" ||
    { cat "$work/crane.log" >&2; log "crane mutate failed"; exit 1; }
mv -f "$output.tmp" "$output"

size="$(du -h "$output" | cut -f1)"
log "$tag written to $output ($size)"
printf '%s\n' "$output"
