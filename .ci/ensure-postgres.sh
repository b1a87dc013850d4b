#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 for user postgres without a password,
# as the registry tests expect: start the machine's cluster, or install one from Debian's packages.
set -euo pipefail

ready() {
    command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 &&
        psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1
}

ready && exit 0
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "installing PostgreSQL from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -n | tail -1)
hba="/etc/postgresql/$version/main/pg_hba.conf"
if ! grep -q "bnserve-ci" "$hba"; then
    # Trust loopback connections, as on the development machines (tests only).
    sed -i '1i host all all 127.0.0.1/32 trust # bnserve-ci\nhost all all ::1/128 trust # bnserve-ci' "$hba"
fi
pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null ||
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
for _ in $(seq 1 30); do
    ready && break
    sleep 1
done
ready || { echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1; }
psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" |
    grep -q 1 || psql -h 127.0.0.1 -U postgres -d postgres -c 'create database test' >/dev/null
