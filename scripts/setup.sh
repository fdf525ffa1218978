#!/usr/bin/env bash
# Installs what the tests need and a fresh Debian/Ubuntu machine lacks, and nothing when all is
# there: protoc and its well-known types (the etcd client crate generates its code at build time),
# etcd, redis-server and pgbouncer (tests start and kill servers of their own), and starts the
# machine's PostgreSQL if it is installed but stopped. Without apt-get it says what is missing;
# tests whose server is absent then skip with a message (or fail under
# TOWER_PRIMARY_REQUIRE_BACKENDS=1).
set -euo pipefail

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# Only a recommendation of protobuf-compiler, so not always there with it.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# pgbouncer lives in /usr/sbin, often not on a user's PATH.
{ command -v pgbouncer || [ -x /usr/sbin/pgbouncer ]; } >/dev/null 2>&1 || missing+=(pgbouncer)

if [ ${#missing[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}"
  else
    echo "setup: no apt-get; install these packages (Debian names) yourself: ${missing[*]}" >&2
  fi
fi

# The PostgreSQL backend's tests use the machine's server (DATABASE_URL, by default
# postgres://root@127.0.0.1:5432/test): start it if it is installed and stopped.
if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  version="$(ls /etc/postgresql | head -n1)"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
