#!/bin/sh
# A throwaway PostgreSQL 15 server for the event-store tests and benchmarks.
#
#   test/pg/pg_ctl.sh start        initdb (if needed) + start on 127.0.0.1 at a free port
#   test/pg/pg_ctl.sh url [DB]     print a libpq conninfo for DB (default: postgres),
#                                  creating the database first when it does not exist
#   test/pg/pg_ctl.sh restart      pg_ctl restart -m fast (same port, same data)
#   test/pg/pg_ctl.sh down         stop the server, keep the data (start brings it back
#                                  on the same port)
#   test/pg/pg_ctl.sh stop         stop the server and delete its data directory
#   test/pg/pg_ctl.sh status       exit 0 when running
#
# The server lives in $DX_PG_DIR (default: <repo>/_build/pg): data/, server.log, port.
# It listens on 127.0.0.1 only (no Unix socket), trust authentication, user postgres.
# initdb refuses to run as root, so as root every server command runs as Debian's
# `postgres` user (runuser) and the directory is owned by it; as another user the
# commands run as that user. Binaries: $DX_PG_BIN (default /usr/lib/postgresql/15/bin).
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PGDIR=${DX_PG_DIR:-$ROOT/_build/pg}
BIN=${DX_PG_BIN:-/usr/lib/postgresql/15/bin}
DATA=$PGDIR/data
LOG=$PGDIR/server.log
PORTFILE=$PGDIR/port

say() { echo "pg_ctl.sh: $*" >&2; }
die() { say "$*"; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

[ -x "$BIN/pg_ctl" ] || die "no PostgreSQL binaries in $BIN (install the Debian package postgresql)"

running() { [ -f "$DATA/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

free_port() {
    /usr/bin/python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_free() { # with SO_REUSEADDR, as the server binds: a port in TIME_WAIT is free
    /usr/bin/python3 -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

write_conf() { # $1 = port
    as_pg sh -c "cat > '$DATA/dspex.conf'" <<CONF
# written by test/pg/pg_ctl.sh
port = $1
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 40
shared_buffers = 32MB
logging_collector = off
CONF
    echo "$1" > "$PORTFILE"
}

do_initdb() {
    rm -rf "$DATA"
    mkdir -p "$PGDIR"
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$PGDIR"
    as_pg test -w "$PGDIR" -a -x "$PGDIR" ||
        die "the server's user cannot write $PGDIR (is every parent directory searchable by it?); set DX_PG_DIR"
    as_pg "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C -N >"$PGDIR/initdb.log" 2>&1 ||
        { cat "$PGDIR/initdb.log" >&2; die "initdb failed"; }
    echo "include 'dspex.conf'" | as_pg sh -c "cat >> '$DATA/postgresql.conf'"
}

start() {
    if running; then say "already running on port $(cat "$PORTFILE")"; return 0; fi
    [ -f "$DATA/PG_VERSION" ] || do_initdb
    # the port of a previous start when it is still free (so `down` + `start` keeps
    # clients' conninfo valid), else a fresh one; retried when another process takes
    # the port between the probe and the bind
    port=""
    [ -f "$PORTFILE" ] && port_free "$(cat "$PORTFILE")" && port=$(cat "$PORTFILE")
    tries=0
    while :; do
        [ -n "$port" ] || port=$(free_port)
        write_conf "$port"
        if as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null 2>&1; then
            say "PostgreSQL $(cat "$DATA/PG_VERSION") running on 127.0.0.1:$port (data: $DATA)"
            return 0
        fi
        tries=$((tries + 1))
        [ "$tries" -lt 5 ] || { tail -n 20 "$LOG" >&2 || true; die "could not start the server"; }
        port=""
    done
}

psql_admin() { # $@ = psql args; runs against the postgres database
    "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(cat "$PORTFILE")" -U postgres -d postgres "$@"
}

url() {
    db=${1:-postgres}
    running || die "not running (run: $0 start)"
    case "$db" in
        *[!a-z0-9_]* | [0-9]* | "") die "database name must match [a-z_][a-z0-9_]*: $db" ;;
    esac
    if [ "$db" != postgres ]; then
        exists=$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")
        if [ "$exists" != 1 ]; then
            # two callers may race to create it: the loser's error is fine when it exists now
            psql_admin -c "CREATE DATABASE $db" 2>/dev/null ||
                [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" = 1 ] ||
                die "could not create database $db"
        fi
    fi
    echo "host=127.0.0.1 port=$(cat "$PORTFILE") user=postgres dbname=$db connect_timeout=10"
}

case "${1:-}" in
    start) start ;;
    url) url "${2:-}" ;;
    restart)
        running || die "not running"
        as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -m fast restart >/dev/null
        ;;
    down)
        if running; then as_pg "$BIN/pg_ctl" -D "$DATA" -w -t 60 -m fast stop >/dev/null; fi
        ;;
    stop)
        if running; then as_pg "$BIN/pg_ctl" -D "$DATA" -w -t 60 -m fast stop >/dev/null; fi
        rm -rf "$DATA" "$PORTFILE"
        ;;
    status) running ;;
    *) echo "usage: $0 start|url [DB]|restart|down|stop|status" >&2; exit 2 ;;
esac
