#!/usr/bin/env bash
# Lays out the operator image's root filesystem in DIR from a `cutover` binary. Used by
# hack/build-image.sh (`make image`) and by the Dockerfile, so both give the same layout:
#
#   /usr/local/bin/cutover              the binary, stripped of its symbol table
#   the shared libraries `ldd` lists    at the paths it lists them, e.g.
#                                       /lib/x86_64-linux-gnu/libc.so.6, /lib64/ld-linux-x86-64.so.2
#   /etc/ssl/certs/ca-certificates.crt  the CA bundle (rustls-native-certs reads it)
#   /etc/passwd, /etc/group             a `cutover` user and group, 65532
#   /tmp                                mode 1777
#
#   hack/image-rootfs.sh BINARY DIR [NAME]
#
# NAME (default cutover) is the file name under /usr/local/bin; the e2e bed builds its other
# images (the pause container, a test workload) the same way. A static binary gets no libraries.
set -euo pipefail

binary="${1:?usage: image-rootfs.sh BINARY DIR [NAME]}"
rootfs="${2:?usage: image-rootfs.sh BINARY DIR [NAME]}"
name="${3:-cutover}"

mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
cp "$binary" "$rootfs/usr/local/bin/$name"
if command -v strip >/dev/null; then
    strip --strip-unneeded "$rootfs/usr/local/bin/$name"
fi
chmod 755 "$rootfs/usr/local/bin/$name"

# Every library the dynamic loader resolves, and the loader itself, at the path ldd names,
# following symlinks (/lib64/ld-linux-x86-64.so.2 is a link on the host, a file here).
if ldd "$binary" >/dev/null 2>&1; then
    libs="$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)"
    if [[ -z "$libs" ]]; then
        echo "image-rootfs: ldd lists no library for $binary" >&2
        exit 1
    fi
else
    libs="" # a static executable
fi
for lib in $libs; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done

cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\ncutover:x:65532:65532:cutover:/tmp:/usr/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\ncutover:x:65532:\n' >"$rootfs/etc/group"
chmod 644 "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/ssl/certs/ca-certificates.crt"
