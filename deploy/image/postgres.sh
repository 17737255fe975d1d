#!/bin/sh
# The compose stack's PostgreSQL (deploy/image/Dockerfile, target postgres): on first start,
# a cluster in /data whose owner role is $POSTGRES_USER with $POSTGRES_PASSWORD, and a
# database of the same name; then the server, listening on every address of its container.
set -eu
bin=/usr/lib/postgresql/15/bin
if [ ! -s /data/PG_VERSION ]; then
    pw=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pw"
    "$bin/initdb" -D /data -U "$POSTGRES_USER" --pwfile="$pw" --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 >/dev/null
    rm -f "$pw"
    echo "host all all all scram-sha-256" >> /data/pg_hba.conf
    "$bin/pg_ctl" -D /data -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
    "$bin/createdb" -h /tmp -U "$POSTGRES_USER" "$POSTGRES_USER"
    "$bin/pg_ctl" -D /data -m fast -w stop >/dev/null
fi
exec "$bin/postgres" -D /data -c listen_addresses='*' -c unix_socket_directories=/tmp
