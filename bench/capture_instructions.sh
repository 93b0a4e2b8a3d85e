#!/usr/bin/env bash
# bench/capture_instructions.sh — what capture costs one UPDATE transaction, in CPU instructions.
#
# Usage:  bash bench/capture_instructions.sh        (needs valgrind and the PostgreSQL server binaries)
#
# TPS on a shared 2-core machine moves by ±30 % from run to run, so small changes to the generated
# trigger code cannot be judged by TPS. Instruction counts can: callgrind counts the instructions a
# backend executes, the same total every run for the same binary, data and statements, whatever
# else the machine is doing. (They do not show cache misses, which is why capture costs more
# microseconds at pgbench scale, where other processes evict the trigger's code and data between
# transactions, than inside one busy backend.)
#
# What it does: starts a throwaway PostgreSQL server (initdb in a temporary directory, a Unix
# socket only, autovacuum off) with its postmaster under callgrind, so every backend writes its own
# instruction count when it exits. Two databases hold the same `clients` table (sql/vcs/tables.sql)
# and data: "off" without capture, "on" with sql/install.sql + the VCS preset + one enabled handler
# on clients.*. Each workload is a file of single-row UPDATEs, one transaction each, sent by psql
# (simple protocol: each statement is also parsed and planned). A session of $SHORT updates and one
# of $LONG updates are counted; their difference divided by ($LONG - $SHORT) is the cost of one
# update transaction, start-up and first-call costs (plan caching, compiling the trigger) excluded.
#   quiet: balance moves by -10..10 and stays far from zero: no event fires, only capture's tests run
#   emit:  balance changes sign: exactly one event (clients.balance_zero / _notzero) + its delivery
# Environment: SHORT (default 200), LONG (default 1200), PORT (default 5499), KEEP=1 keeps the
# temporary directory (the callgrind files can be read with callgrind_annotate), VARIANT=<file>
# applies an SQL file to the "on" database after installing (to measure a change to the generated
# capture code before building it into install.sql).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHORT=${SHORT:-200}
LONG=${LONG:-1200}
PORT=${PORT:-5499}
VARIANT=${VARIANT:-}
[[ -z $VARIANT || -r $VARIANT ]] || { echo "VARIANT=$VARIANT: no such file" >&2; exit 2; }
VARIANT=${VARIANT:+$(cd "$(dirname "$VARIANT")" && pwd)/$(basename "$VARIANT")}
KEEP=${KEEP:-0}

command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
BINDIR=$(pg_config --bindir 2>/dev/null || true)
if [[ -z $BINDIR || ! -x $BINDIR/postgres ]]; then
    BINDIR=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
fi
[[ -x $BINDIR/postgres && -x $BINDIR/initdb ]] || { echo "cannot find the PostgreSQL server binaries (postgres, initdb)" >&2; exit 1; }

# initdb and postgres refuse to run as root: run the server as the postgres user then.
AS=()
if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || { echo "running as root needs a 'postgres' user to run the server" >&2; exit 1; }
    AS=(runuser -u postgres --)
fi
DIR=$(mktemp -d /tmp/capture_instructions.XXXXXX)
chmod 755 "$DIR"
[[ ${#AS[@]} -eq 0 ]] || chown postgres "$DIR"
PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres)
VG_PID=""

cleanup() {
    if [[ -n $VG_PID ]] && kill -0 "$VG_PID" 2>/dev/null; then
        kill -INT "$VG_PID" 2>/dev/null || true
        for _ in $(seq 300); do kill -0 "$VG_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    if [[ $KEEP == 1 ]]; then echo "kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "initdb in $DIR ($BINDIR)"
"${AS[@]}" "$BINDIR/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
mkdir -p "$DIR/cg"
[[ ${#AS[@]} -eq 0 ]] || chown postgres "$DIR/cg"
log "starting PostgreSQL under callgrind on socket $DIR port $PORT"
"${AS[@]}" valgrind --tool=callgrind --callgrind-out-file="$DIR/cg/cg.%p" \
    "$BINDIR/postgres" -D "$DIR/data" -p "$PORT" -k "$DIR" -c listen_addresses= -c autovacuum=off \
    >"$DIR/server.log" 2>&1 &
VG_PID=$!
for _ in $(seq 600); do
    "${PSQL[@]}" -d postgres -c "SELECT 1" >/dev/null 2>&1 && break
    kill -0 "$VG_PID" 2>/dev/null || { cat "$DIR/server.log" >&2; echo "the server did not start" >&2; exit 1; }
    sleep 0.2
done

"${PSQL[@]}" -d postgres -c "CREATE DATABASE bench_off" -c "CREATE DATABASE bench_on"
"${PSQL[@]}" -d bench_off -f "$ROOT/sql/vcs/tables.sql" >/dev/null
"${PSQL[@]}" -d bench_on -f "$ROOT/sql/install.sql" -f "$ROOT/sql/vcs/install.sql" >/dev/null
"${PSQL[@]}" -d bench_on -c "INSERT INTO provisioning.handlers (name, events, kind, target)
                             VALUES ('bench', '{clients.*}', 'http', 'http://127.0.0.1:9/bench')" >/dev/null
if [[ -n $VARIANT ]]; then
    "${PSQL[@]}" -d bench_on -v ON_ERROR_STOP=1 -f "$VARIANT" >/dev/null
fi

# The statement files: the session's backend pid first (its callgrind file is cg.<pid>).
ROWS=10000
for n in "$SHORT" "$LONG"; do
    for mode in quiet emit; do
        awk -v n="$n" -v rows="$ROWS" -v mode="$mode" -v pidfile="$DIR/pid" 'BEGIN {
            srand(42)
            print "SELECT pg_backend_pid() AS pid \\gset"
            print "\\o " pidfile; print "\\qecho :pid"; print "\\o"
            for (i = 0; i < n; i++) {
                id = 1 + int(rand() * rows)
                if (mode == "quiet") printf "UPDATE clients SET balance = balance + %d WHERE id = %d;\n", int(rand() * 21) - 10, id
                else printf "UPDATE clients SET balance = -balance WHERE id = %d;\n", id
            }
        }' >"$DIR/$mode.$n.sql"
    done
done

# reset <db> <mode>: identical data; quiet: balances 1000..1049; emit: -25..25 without 0.
reset() {
    local db=$1 mode=$2 balance prelude=""
    if [[ $mode == quiet ]]; then balance="1000 + g % 50"; else balance="CASE WHEN g % 2 = 0 THEN 1 + g % 25 ELSE -1 - g % 25 END"; fi
    [[ $db == bench_on ]] && prelude="SET provisioning.suppress = 'on'; TRUNCATE provisioning.events, provisioning.deliveries, provisioning.attempts;"
    "${PSQL[@]}" -d "$db" -c "SET client_min_messages = warning; $prelude TRUNCATE clients CASCADE;
        INSERT INTO clients (id, name, balance, email, company, custom_fields)
        SELECT g, 'client ' || g, $balance, 'c' || g || '@example.com', 'Company ' || (g % 97),
               jsonb_build_object('tariff', 'T' || (g % 5))
          FROM generate_series(1, $ROWS) g" -c "VACUUM ANALYZE clients" >/dev/null
}

# count <db> <mode> <n>: instructions of one session running the n-update file.
count() {
    local db=$1 mode=$2 n=$3 pid file
    rm -f "$DIR/pid"
    "${PSQL[@]}" -d "$db" -f "$DIR/$mode.$n.sql" >/dev/null
    pid=$(tr -d '[:space:]' <"$DIR/pid")
    file="$DIR/cg/cg.$pid"
    for _ in $(seq 600); do grep -q '^totals:' "$file" 2>/dev/null && break; sleep 0.2; done
    grep -m1 '^totals:' "$file" | awk '{ print $2 }'
}

declare -A COST EVENTS
for mode in quiet emit; do
    for db in bench_off bench_on; do
        reset "$db" "$mode"; a=$(count "$db" "$mode" "$SHORT")
        reset "$db" "$mode"; b=$(count "$db" "$mode" "$LONG")
        [[ -n $a && -n $b ]] || { echo "no instruction count for $db/$mode" >&2; exit 1; }
        COST[$db,$mode]=$(( (b - a) / (LONG - SHORT) ))
        if [[ $db == bench_on ]]; then
            EVENTS[$mode]=$("${PSQL[@]}" -At -d "$db" -c "SELECT count(*) FROM provisioning.events")
            # A figure is only worth printing if capture did what the workload says.
            want=0; [[ $mode == emit ]] && want=$LONG
            if [[ ${EVENTS[$mode]} != "$want" ]]; then
                echo "capture misbehaved: the $mode workload of $LONG updates wrote ${EVENTS[$mode]} events, expected $want" >&2
                exit 1
            fi
        fi
        log "$db $mode: ${COST[$db,$mode]} instructions per update"
    done
done

echo
echo "instructions per single-row UPDATE transaction, one backend (callgrind; psql, one statement per"
echo "transaction; ${SHORT} vs ${LONG} updates), capture = sql/install.sql + VCS preset + 1 handler${VARIANT:+ + variant $VARIANT}"
printf '%-34s %12s %12s %14s %8s\n' "" "no capture" "capture" "capture cost" "events"
for mode in quiet emit; do
    label="no event fires"
    [[ $mode == emit ]] && label="every update emits one event"
    off=${COST[bench_off,$mode]} on=${COST[bench_on,$mode]}
    printf '%-34s %12d %12d %+14d %8s\n' "$label" "$off" "$on" "$((on - off))" "${EVENTS[$mode]}/${LONG}"
done
