-- Server-side microbenchmark for bench/capture.sh: the cost of one single-row UPDATE on clients in
-- its own transaction, measured inside one backend (no network, asynchronous commit), so it
-- isolates what capture adds to a transaction — including what PL/pgSQL redoes once per
-- transaction (preparing the trigger's expressions), which a loop inside one transaction hides.
--   psql -v mode=quiet|emit -v n=20000 -v rows=10000 -v hz=100 -f bench/capture_micro.sql
-- quiet: balance moves away from zero (no event fires; only the trigger's test runs)
-- emit:  balance changes sign (clients.balance_zero / _notzero fire for every non-zero row)
-- The updates commit (one transaction each): run it on a scratch database. Events written in
-- emit mode stay in the outbox.
-- Prints "micro <cpu us per update> <wall us per update>". CPU time is the backend's own user +
-- system time from /proc/self/stat (Linux server, superuser), so other busy processes on the
-- machine barely affect it; it is -1 where that file cannot be read.
\set ON_ERROR_STOP 1
SET synchronous_commit = off;
SELECT set_config('bench.mode', :'mode', false), set_config('bench.n', :'n', false),
       set_config('bench.rows', :'rows', false), set_config('bench.hz', :'hz', false) \gset
-- A DO block run outside a transaction block may COMMIT between its statements. (No temporary
-- objects here: a session with a temporary schema takes capture's slower, path-pinning branch.)
DO $micro$
DECLARE
    t0 timestamptz;
    f  text[];
    c0 bigint;
    c1 bigint;
    wall numeric;
    n  int := current_setting('bench.n')::int;
    r  int := current_setting('bench.rows')::int;
    emit boolean := current_setting('bench.mode') = 'emit';
BEGIN
    BEGIN
        f := string_to_array(split_part(pg_read_file('/proc/self/stat'), ') ', 2), ' ');
        c0 := f[12]::bigint + f[13]::bigint;   -- utime + stime (fields 14, 15)
    EXCEPTION WHEN others THEN
        c0 := NULL;
    END;
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP
        IF emit THEN
            UPDATE clients SET balance = -balance WHERE id = 1 + (i * 7919) % r;
        ELSE
            UPDATE clients SET balance = balance + sign(balance) WHERE id = 1 + (i * 7919) % r;
        END IF;
        COMMIT;
    END LOOP;
    wall := extract(epoch FROM clock_timestamp() - t0) * 1e6 / n;
    IF c0 IS NOT NULL THEN
        f := string_to_array(split_part(pg_read_file('/proc/self/stat'), ') ', 2), ' ');
        c1 := f[12]::bigint + f[13]::bigint;
    END IF;
    RAISE NOTICE 'micro % %',
        coalesce(round((c1 - c0)::numeric / current_setting('bench.hz')::numeric * 1e6 / n, 2), -1), round(wall, 2);
END
$micro$;
