#!/usr/bin/env bash
# bench/capture.sh — what event capture costs the writers of a watched table.
#
# Usage:
#   bench/capture.sh                      # defaults below
#   DURATION=60 CLIENTS="4 8" bench/capture.sh
#
# Environment:
#   DATABASE_URL  server to use (default postgres://postgres@127.0.0.1:5432/postgres); the script
#                 creates and finally drops its own databases  $BENCH_DB  and  ${BENCH_DB}_off
#   BENCH_DB      name of the scratch database (default relay_bench_capture)
#   DURATION      seconds per pgbench run (default 20)
#   CLIENTS       writer counts to measure (default "1 4 8"); pgbench -c N -j N
#   ROUNDS        measurements per configuration and writer count, in alternating order (default 2)
#   ROWS          clients rows (default 10000)
#   HANDLER       1 (default): one enabled handler subscribed to clients.*, so every emitted event
#                 also creates a delivery, as in production; 0: no handler (events only)
#   KEEP          1: keep the databases afterwards for inspection
#   MICRO         1 (default): also run bench/capture_micro.sql — the server-side cost of one UPDATE
#                 transaction, no network, asynchronous commit — on both databases, 5 times each, alternating;
#                 reported as backend CPU time (robust against a busy machine) and wall time
#   VARIANT       name of an experiment applied to the "on" database after installing, from
#                 bench/capture_variant_<VARIANT>.sql (write one to try a change); default none
#
# What it does: two databases with the same `clients` table (sql/vcs/tables.sql) and the same data
# (ROWS clients, balances uniformly spread over -50..50, a fixed random seed):
#   off  — tables only, no triggers;
#   on   — sql/install.sql + sql/vcs/install.sql (the 15 VCS events) [+ the handler].
# Each run: reload the data, VACUUM ANALYZE, CHECKPOINT, then pgbench (-M prepared) runs
# bench/capture_update.sql — UPDATE clients SET balance = balance + random(-10,10) WHERE id = random
# — for DURATION seconds. Runs alternate off/on (on/off in the next round) to spread drift evenly.
# Durability settings are the server's own (synchronous_commit, fsync untouched).
# Reported: TPS without and with capture (mean of ROUNDS), their ratio, the median and range of the
# ratios of adjacent off/on pairs (robust against drift and noisy neighbours), and how many events
# the "on" runs captured (and per update). No relay runs: deliveries stay pending, as a backlog would.
# The load average is printed before and after: on a shared machine, treat a high one with care.
# When the server runs on this machine (its postmaster visible in /proc), the script also reports
# the server CPU time per update (backends' user+system time, collected by the postmaster when they
# exit): it moves much less than TPS when other processes compete for the CPU or the disk.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BENCH_DB=${BENCH_DB:-relay_bench_capture}
DURATION=${DURATION:-20}
CLIENTS=${CLIENTS:-"1 4 8"}
ROUNDS=${ROUNDS:-2}
ROWS=${ROWS:-10000}
HANDLER=${HANDLER:-1}
KEEP=${KEEP:-0}
VARIANT=${VARIANT:-}
MICRO=${MICRO:-1}
PGBENCH=${PGBENCH:-pgbench}
PSQL=(psql -X -q -v ON_ERROR_STOP=1)

# DATABASE_URL with its database name replaced by $1 (query string kept).
url_for() {
    local url=$DATABASE_URL query="" head rest
    if [[ $url == *\?* ]]; then query="?${url#*\?}"; url=${url%%\?*}; fi
    head=${url%%://*}://; rest=${url#*://}
    rest=${rest%%/*}
    printf '%s%s/%s%s' "$head" "$rest" "$1" "$query"
}

ADMIN_URL=$DATABASE_URL
ON_URL=$(url_for "$BENCH_DB")
OFF_URL=$(url_for "${BENCH_DB}_off")

cleanup() {
    if [[ $KEEP != 1 ]]; then
        "${PSQL[@]}" -d "$ADMIN_URL" -c "DROP DATABASE IF EXISTS ${BENCH_DB} WITH (FORCE)" \
                                     -c "DROP DATABASE IF EXISTS ${BENCH_DB}_off WITH (FORCE)" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "setting up ${BENCH_DB} (capture) and ${BENCH_DB}_off (no capture), ${ROWS} clients"
"${PSQL[@]}" -d "$ADMIN_URL" -c "DROP DATABASE IF EXISTS ${BENCH_DB} WITH (FORCE)" \
    -c "DROP DATABASE IF EXISTS ${BENCH_DB}_off WITH (FORCE)" \
    -c "CREATE DATABASE ${BENCH_DB}" -c "CREATE DATABASE ${BENCH_DB}_off" 2>/dev/null
"${PSQL[@]}" -d "$OFF_URL" -f "$ROOT/sql/vcs/tables.sql"
"${PSQL[@]}" -d "$ON_URL" -f "$ROOT/sql/install.sql" -f "$ROOT/sql/vcs/install.sql" >/dev/null
if [[ -n $VARIANT ]]; then
    log "applying variant $VARIANT to ${BENCH_DB}"
    "${PSQL[@]}" -d "$ON_URL" -f "$ROOT/bench/capture_variant_${VARIANT}.sql"
fi
if [[ $HANDLER == 1 ]]; then
    "${PSQL[@]}" -d "$ON_URL" -c "INSERT INTO provisioning.handlers (name, events, kind, target)
                                  VALUES ('bench', '{clients.*}', 'http', 'http://127.0.0.1:9/bench')"
fi

# Reload identical data into one database and settle it (vacuum, statistics, checkpoint).
reset_data() {
    local url=$1 mode=$2 prelude=""
    if [[ $mode == on ]]; then
        prelude="SET provisioning.suppress = 'on';
                 TRUNCATE provisioning.events, provisioning.deliveries, provisioning.attempts;"
    fi
    "${PSQL[@]}" -d "$url" -c "SET client_min_messages = warning; $prelude
        TRUNCATE clients CASCADE;
        SELECT setseed(0.42);
        INSERT INTO clients (id, name, balance, email, company, custom_fields)
        SELECT g, 'client ' || g, floor(random() * 101) - 50, 'c' || g || '@example.com', 'Company ' || (g % 97),
               jsonb_build_object('tariff', 'T' || (g % 5))
          FROM generate_series(1, ${ROWS}) g;" >/dev/null
    "${PSQL[@]}" -d "$url" -c "VACUUM ANALYZE clients" -c "CHECKPOINT"
    if [[ $mode == on ]]; then
        "${PSQL[@]}" -d "$url" -c "VACUUM ANALYZE provisioning.events" -c "VACUUM ANALYZE provisioning.deliveries"
    fi
}

# Postmaster of a local server: its cutime+cstime grows by the CPU time of every backend that exits.
PM_PID=$("${PSQL[@]}" -At -d "$ADMIN_URL" -c "SELECT (regexp_match(pg_read_file('postmaster.pid'), '^[0-9]+'))[1]" 2>/dev/null || true)
if [[ -z $PM_PID || ! -r /proc/$PM_PID/stat ]] || ! grep -q '(postgres)' "/proc/$PM_PID/stat" 2>/dev/null; then PM_PID=""; fi
CLK_TCK=$(getconf CLK_TCK)
pm_cpu_ticks() {
    if [[ -n $PM_PID ]]; then awk '{ print $16 + $17 }' "/proc/$PM_PID/stat"; else echo 0; fi
}

declare -A TPS_SUM TPS XACTS EVENTS DELIVERIES CPU_TICKS UPDATES
# run <on|off> <writers>: one measurement; accumulates TPS (and events for "on").
run() {
    local mode=$1 n=$2 round=$3 url out tps xacts
    if [[ $mode == on ]]; then url=$ON_URL; else url=$OFF_URL; fi
    reset_data "$url" "$mode"
    local cpu0 cpu1
    cpu0=$(pm_cpu_ticks)
    out=$("$PGBENCH" -n -M prepared -c "$n" -j "$n" -T "$DURATION" -D rows="$ROWS" \
                     -f "$ROOT/bench/capture_update.sql" "$url" 2>&1) || { echo "$out" >&2; exit 1; }
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | tail -1)
    xacts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    [[ -n $tps && -n $xacts ]] || { echo "cannot parse pgbench output:" >&2; echo "$out" >&2; exit 1; }
    cpu1=$(pm_cpu_ticks)
    CPU_TICKS[$mode,$n]=$(( ${CPU_TICKS[$mode,$n]:-0} + cpu1 - cpu0 ))
    UPDATES[$mode,$n]=$(( ${UPDATES[$mode,$n]:-0} + xacts ))
    TPS[$mode,$n,$round]=$tps
    TPS_SUM[$mode,$n]=$(awk -v a="${TPS_SUM[$mode,$n]:-0}" -v b="$tps" 'BEGIN { printf "%.3f", a + b }')
    if [[ $mode == on ]]; then
        local counts
        counts=$("${PSQL[@]}" -At -F ' ' -d "$url" -c "SELECT (SELECT count(*) FROM provisioning.events),
                                                              (SELECT count(*) FROM provisioning.deliveries)")
        XACTS[$n]=$(( ${XACTS[$n]:-0} + xacts ))
        EVENTS[$n]=$(( ${EVENTS[$n]:-0} + ${counts% *} ))
        DELIVERIES[$n]=$(( ${DELIVERIES[$n]:-0} + ${counts#* } ))
        log "  on  c=$n: tps=$tps  updates=$xacts  events=${counts% *}  deliveries=${counts#* }  server cpu=$(( (cpu1 - cpu0) * 1000 / CLK_TCK ))ms"
    else
        log "  off c=$n: tps=$tps  updates=$xacts  server cpu=$(( (cpu1 - cpu0) * 1000 / CLK_TCK ))ms"
    fi
}

log "server: $("${PSQL[@]}" -At -d "$ADMIN_URL" -c "SELECT 'PostgreSQL ' || current_setting('server_version') || ', synchronous_commit=' || current_setting('synchronous_commit') || ', fsync=' || current_setting('fsync') || ', shared_buffers=' || current_setting('shared_buffers')")"
log "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
log "runs: writers {$CLIENTS} x ${ROUNDS} rounds x {off,on} x ${DURATION}s"
for ((round = 1; round <= ROUNDS; round++)); do
    for n in $CLIENTS; do
        if (( round % 2 == 1 )); then run off "$n" "$round"; run on "$n" "$round"
        else run on "$n" "$round"; run off "$n" "$round"; fi
    done
done

log "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "capture cost: single-row balance updates on clients, pgbench -M prepared, ${DURATION}s x ${ROUNDS} runs each (mean TPS)"
echo "capture = sql/install.sql + VCS preset (15 events)$([[ $HANDLER == 1 ]] && echo ' + 1 enabled handler on clients.*')$([[ -n $VARIANT ]] && echo " + variant $VARIANT")"
printf '%-8s %14s %14s %8s %20s %10s %10s\n' writers "TPS no capture" "TPS capture" ratio "pair ratios: median" "(min-max)" "events/upd"
for n in $CLIENTS; do
    pairs=""
    for ((round = 1; round <= ROUNDS; round++)); do
        pairs+="$(awk -v a="${TPS[on,$n,$round]}" -v b="${TPS[off,$n,$round]}" 'BEGIN { printf "%.4f", a / b }') "
    done
    awk -v n="$n" -v off="${TPS_SUM[off,$n]}" -v on="${TPS_SUM[on,$n]}" -v r="$ROUNDS" \
        -v ev="${EVENTS[$n]}" -v x="${XACTS[$n]}" -v pairs="$pairs" '
        BEGIN {
            k = split(pairs, p, " "); for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (p[j] < p[i]) { t = p[i]; p[i] = p[j]; p[j] = t }
            med = (k % 2) ? p[(k + 1) / 2] : (p[k / 2] + p[k / 2 + 1]) / 2
            printf "%-8s %14.0f %14.0f %8.3f %20.3f %10s %9.2f%%\n", n, off / r, on / r, on / off, med,
                   sprintf("(%.2f-%.2f)", p[1], p[k]), 100 * ev / x
        }'
done
if [[ -n $PM_PID ]]; then
    echo
    echo "server CPU per update (all backends of the runs, user+system), lower is better"
    printf '%-8s %16s %16s %8s %14s\n' writers "no capture (us)" "capture (us)" ratio "capture cost"
    for n in $CLIENTS; do
        awk -v n="$n" -v co="${CPU_TICKS[off,$n]}" -v uo="${UPDATES[off,$n]}" -v cn="${CPU_TICKS[on,$n]}" \
            -v un="${UPDATES[on,$n]}" -v hz="$CLK_TCK" '
            BEGIN {
                off = co / hz * 1e6 / uo; on = cn / hz * 1e6 / un
                printf "%-8s %16.1f %16.1f %8.3f %11.1f us\n", n, off, on, off / on, on - off
            }'
    done
fi

# micro <url> <mode>: "<cpu us> <wall us>" per single-row UPDATE transaction inside one backend (bench/capture_micro.sql).
micro() {
    "${PSQL[@]}" -d "$1" -v mode="$2" -v n=20000 -v rows="$ROWS" -v hz="$CLK_TCK" -f "$ROOT/bench/capture_micro.sql" 2>&1 >/dev/null |
        sed -n 's/.*NOTICE:  micro \([-0-9.]*\) \([0-9.]*\).*/\1 \2/p'
}
if [[ $MICRO == 1 ]]; then
    reset_data "$ON_URL" on
    reset_data "$OFF_URL" off
    declare -A CPU WALL
    for ((i = 1; i <= 5; i++)); do
        for cfg in off,quiet on,quiet off,emit on,emit; do
            mode=${cfg#*,}
            if [[ ${cfg%,*} == on ]]; then url=$ON_URL; else url=$OFF_URL; fi
            v=$(micro "$url" "$mode")
            [[ -n $v ]] || { echo "micro benchmark failed ($cfg)" >&2; exit 1; }
            CPU[$cfg]+="${v% *} "
            WALL[$cfg]+="${v#* } "
        done
    done
    # median of a space-separated list
    median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
    echo
    echo "server-side cost of one single-row UPDATE transaction (no network, asynchronous commit; median of 5 x 20000)"
    printf '%-30s %-5s %12s %12s %14s\n' "" "" "no capture" "capture" "capture cost"
    for what in quiet emit; do
        label="no event fires"
        [[ $what == emit ]] && label="every update emits one event"
        for kind in cpu wall; do
            if [[ $kind == cpu ]]; then a=$(median "${CPU[off,$what]}"); b=$(median "${CPU[on,$what]}")
            else a=$(median "${WALL[off,$what]}"); b=$(median "${WALL[on,$what]}"); fi
            awk -v l="$label" -v k="$kind" -v a="$a" -v b="$b" \
                'BEGIN { if (a < 0) exit; printf "%-30s %-5s %9.1f us %9.1f us %11.1f us\n", l, k, a, b, b - a }'
            label=""
        done
    done
fi
