# The operator image, for those who build with Docker (or BuildKit, Podman, Kaniko):
#
#   docker build -t ghcr.io/dbops/cutover:0.1.0 .
#
# It gives the same layout as `make image` (hack/build-image.sh, which needs no Docker daemon
# and is the build the project's tests use): the release `cutover` binary, the shared
# libraries it links at the paths `ldd` lists, CA certificates, user 65532, entrypoint cutover.
# Both lay out the root filesystem with hack/image-rootfs.sh. This file is not built by the
# project's CI (no Docker daemon there); see docs/image.md.

# Debian 12 (bookworm) with the toolchain rust-toolchain.toml pins: the libraries copied into
# the image are the ones the binary was linked against.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cutover-operator --bin cutover \
 && hack/image-rootfs.sh target/release/cutover /rootfs

FROM scratch
COPY --from=build /rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /
ENTRYPOINT ["/usr/local/bin/cutover"]
