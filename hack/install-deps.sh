#!/usr/bin/env bash
# Installs what `make test` and `make demo` need and a fresh machine may lack. Idempotent: a
# machine that has everything is left alone (no apt-get update, no network).
set -euo pipefail

missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v pg_config >/dev/null; then
  missing+=(postgresql postgresql-contrib)
fi
if ! command -v psql >/dev/null; then
  missing+=(postgresql-client)
fi
if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then
  missing+=(golang-go)
fi
# promtool checks the chart's alerting rules (Debian's prometheus package ships it).
if ! command -v promtool >/dev/null; then
  missing+=(prometheus)
fi
# The real node of the e2e bed: containerd, runc and the CNI plugins (iptables comes with them).
if ! command -v containerd >/dev/null || ! command -v ctr >/dev/null; then
  missing+=(containerd)
fi
if ! command -v runc >/dev/null; then
  missing+=(runc)
fi
if [ ! -x /usr/lib/cni/bridge ]; then
  missing+=(containernetworking-plugins)
fi
# hack/install-pg.sh fetches PostgreSQL 18 for the version matrix with pip.
if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
  missing+=(python3 python3-pip)
fi
# The image build copies the libraries the binary links (ldd) and CA certificates.
if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then
  missing+=(ca-certificates)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]} — run as root or install them with apt-get" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # No service may start from a package's postinst (prometheus would listen on :9090,
  # containerd on its default socket): the tests start what they need themselves.
  # policy-rc.d exiting 101 is Debian's way to say so; it is removed again if we added it.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# The test harness runs PostgreSQL as this user when the tests run as root.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
