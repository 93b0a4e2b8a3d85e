-- Server-side microbenchmark for bench/capture.sh: the cost of one single-row UPDATE statement on
-- clients, measured inside one backend (no network, no commit), so it isolates what capture adds
-- to the statement itself. Runs in a transaction that is rolled back: no data or events remain.
--   psql -v mode=quiet|emit -v n=20000 -v rows=10000 -v hz=100 -f bench/capture_micro.sql
-- quiet: balance moves away from zero (no event fires; only the triggers' WHEN clauses run)
-- emit:  balance changes sign (clients.balance_zero / _notzero fire for every non-zero row)
-- Prints "micro <cpu us per update> <wall us per update>". CPU time is the backend's own user +
-- system time from /proc/self/stat (Linux server, superuser), so other busy processes on the
-- machine barely affect it; it is -1 where that file cannot be read.
\set ON_ERROR_STOP 1
BEGIN;
SELECT set_config('bench.mode', :'mode', true), set_config('bench.n', :'n', true),
       set_config('bench.rows', :'rows', true), set_config('bench.hz', :'hz', true) \gset
DO $micro$
DECLARE
    t0 timestamptz;
    wall numeric;
    c0 bigint;
    c1 bigint;
    n  int := current_setting('bench.n')::int;
    r  int := current_setting('bench.rows')::int;
    i  int;
    f  text[];
BEGIN
    BEGIN
        f := string_to_array(split_part(pg_read_file('/proc/self/stat'), ') ', 2), ' ');
        c0 := f[12]::bigint + f[13]::bigint;   -- utime + stime (fields 14, 15)
    EXCEPTION WHEN others THEN
        c0 := NULL;
    END;
    t0 := clock_timestamp();
    IF current_setting('bench.mode') = 'emit' THEN
        FOR i IN 1..n LOOP
            UPDATE clients SET balance = -balance WHERE id = 1 + (i * 7919) % r;
        END LOOP;
    ELSE
        FOR i IN 1..n LOOP
            UPDATE clients SET balance = balance + sign(balance) WHERE id = 1 + (i * 7919) % r;
        END LOOP;
    END IF;
    wall := extract(epoch FROM clock_timestamp() - t0) * 1e6 / n;
    IF c0 IS NOT NULL THEN
        f := string_to_array(split_part(pg_read_file('/proc/self/stat'), ') ', 2), ' ');
        c1 := f[12]::bigint + f[13]::bigint;
    END IF;
    RAISE NOTICE 'micro % %',
        coalesce(round((c1 - c0)::numeric / current_setting('bench.hz')::numeric * 1e6 / n, 2), -1), round(wall, 2);
END
$micro$;
ROLLBACK;
