-- Provisioning Relay: installable schema `provisioning`.
--
--   psql -v ON_ERROR_STOP=1 -f sql/install.sql      (or: relay migrate — the same file, embedded)
--
-- Safe to run any number of times. Every statement is idempotent (IF NOT EXISTS / CREATE OR REPLACE),
-- the whole install is one transaction, and an advisory lock makes two installers racing each other
-- run one after the other. Later versions append guarded upgrade steps below the version-1 body and
-- record themselves in provisioning.schema_version; the relay refuses to run against any other version.
--
-- No psql meta-commands in this file: the relay executes it verbatim.

BEGIN;
SET LOCAL client_min_messages = warning;
-- Serialise concurrent installers: the second waits here until the first commits.
DO $lock$ BEGIN PERFORM pg_advisory_xact_lock(7291850211); END $lock$;

CREATE SCHEMA IF NOT EXISTS provisioning;
COMMENT ON SCHEMA provisioning IS 'Provisioning Relay: event capture outbox, handlers, deliveries, execution log';

CREATE TABLE IF NOT EXISTS provisioning.schema_version (
    version      int PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now(),
    description  text NOT NULL
);

DO $guard$
DECLARE v int;
BEGIN
    SELECT max(version) INTO v FROM provisioning.schema_version;
    IF v > 1 THEN
        RAISE EXCEPTION 'provisioning schema is at version %, newer than this install.sql (version 1)', v
            USING HINT = 'Use the install.sql (or relay binary) of that version or newer; downgrades are not supported.';
    END IF;
END
$guard$;

------------------------------------------------------------------------------------------------------
-- Capture declarations: which tables are watched and which events they emit.
------------------------------------------------------------------------------------------------------

-- One row per watched table.
CREATE TABLE IF NOT EXISTS provisioning.captures (
    relation    text PRIMARY KEY,            -- schema-qualified, quoted as regclass prints it
    entity      text NOT NULL,               -- the object kind in the envelope and for ordering
    key_column  text NOT NULL,               -- its value is the envelope's object_id
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per event and operation. provisioning.declare_event() writes it and regenerates the
-- table's capture trigger for that operation from all its rows.
CREATE TABLE IF NOT EXISTS provisioning.capture_events (
    event           text NOT NULL,
    relation        text NOT NULL REFERENCES provisioning.captures (relation) ON DELETE CASCADE,
    operation       text NOT NULL,
    condition       text,                    -- SQL boolean over old.* / new.*; NULL = always
    compiled_condition text,                 -- the condition as checked and deparsed at declaration
    data_shape      text NOT NULL,           -- row | changed | json_keys | empty
    json_column     text,                    -- for data_shape = json_keys
    exclude_columns text[] NOT NULL DEFAULT '{}',  -- for data_shape = changed: not "changes"
    position        int NOT NULL,            -- order of events emitted by one row change
    trigger_name    text NOT NULL,           -- the table's capture trigger of the operation (an update
                                             -- capture split by columns has prov_capture_update_NN)
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- one event name may fire from several operations (e.g. subscriptions.close on update and delete)
    PRIMARY KEY (event, operation),
    CONSTRAINT capture_events_operation CHECK (operation IN ('insert', 'update', 'delete')),
    CONSTRAINT capture_events_data_shape CHECK (data_shape IN ('row', 'changed', 'json_keys', 'empty'))
);

------------------------------------------------------------------------------------------------------
-- Handlers: who is called for which events.
------------------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS provisioning.handlers (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    priority        int NOT NULL DEFAULT 100,          -- lower runs first
    status          text NOT NULL DEFAULT 'enabled',   -- enabled | paused | disabled | archived
    status_reason   text,                              -- why the relay paused it (e.g. 410 Gone)
    events          text[] NOT NULL,                   -- names, or patterns ending in '*'
    stage           text NOT NULL DEFAULT 'after',     -- after | before
    kind            text NOT NULL,                     -- http | script
    target          text NOT NULL,                     -- http(s) URL, or absolute executable path
    args            text[] NOT NULL DEFAULT '{}',      -- script arguments
    timeout_ms      int NOT NULL DEFAULT 15000,
    retry_schedule_ms int[],                           -- delays before attempt 2, 3, ...; NULL = default
    headers         jsonb NOT NULL DEFAULT '{}',       -- extra HTTP headers {"name": "value"}
    secret          text,                              -- Standard Webhooks signing secret (whsec_...)
    max_in_flight   int NOT NULL DEFAULT 16,
    format          text NOT NULL DEFAULT 'jerasoft',  -- jerasoft | full
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- At most this many attempts started per second by each relay process (0 = no limit): for a
-- receiver with a request quota, which would otherwise answer a backlog with 429s.
ALTER TABLE provisioning.handlers ADD COLUMN IF NOT EXISTS rate_limit_per_s int NOT NULL DEFAULT 0;
-- HTTP statuses (http) or exit codes (script) that are not retried: a failed attempt that ends
-- with one makes the delivery dead at once (kept, shown, replayable), e.g. {400,422} for a
-- receiver that refuses the payload itself, which no retry of the same body would change.
ALTER TABLE provisioning.handlers ADD COLUMN IF NOT EXISTS give_up_on int[] NOT NULL DEFAULT '{}';

-- Refuses bad definitions with a message naming the field. CHECK constraints would do the job,
-- but their messages name only the constraint; DBAs, the CLI and the API all write through here.
CREATE OR REPLACE FUNCTION provisioning.validate_handler() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    e text;
    bad text;
BEGIN
    IF NEW.name IS NULL OR btrim(NEW.name) = '' OR NEW.name ~ '\s' THEN
        RAISE EXCEPTION 'invalid handler: field "name": must be non-empty and contain no whitespace (got %)', coalesce(quote_literal(NEW.name), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.status IS NULL OR NEW.status NOT IN ('enabled', 'paused', 'disabled', 'archived') THEN
        RAISE EXCEPTION 'invalid handler "%": field "status": unknown status %; expected enabled, paused, disabled or archived', NEW.name, coalesce(quote_literal(NEW.status), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.stage IS NULL OR NEW.stage NOT IN ('after', 'before') THEN
        RAISE EXCEPTION 'invalid handler "%": field "stage": unknown stage %; expected after or before', NEW.name, coalesce(quote_literal(NEW.stage), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.kind IS NULL OR NEW.kind NOT IN ('http', 'script') THEN
        RAISE EXCEPTION 'invalid handler "%": field "kind": unknown handler type %; expected http or script', NEW.name, coalesce(quote_literal(NEW.kind), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.kind = 'http' AND (NEW.target IS NULL OR NEW.target !~* '^https?://[^/\s?#@:]+(:[0-9]{1,5})?([/?#][^\s]*)?$') THEN
        RAISE EXCEPTION 'invalid handler "%": field "target": % is not an http(s) URL (expected http://host[:port]/path or https://...)', NEW.name, coalesce(quote_literal(NEW.target), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.kind = 'script' AND (NEW.target IS NULL OR left(NEW.target, 1) <> '/' OR NEW.target ~ '[\n\r\x00]') THEN
        RAISE EXCEPTION 'invalid handler "%": field "target": script path % must be absolute (start with /)', NEW.name, coalesce(quote_literal(NEW.target), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.args IS NULL OR array_position(NEW.args, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'invalid handler "%": field "args": must be an array of non-null strings', NEW.name
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.timeout_ms IS NULL OR NEW.timeout_ms <= 0 OR NEW.timeout_ms > 3600000 THEN
        RAISE EXCEPTION 'invalid handler "%": field "timeout_ms": must be between 1 and 3600000 milliseconds (got %)', NEW.name, coalesce(NEW.timeout_ms::text, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.max_in_flight IS NULL OR NEW.max_in_flight <= 0 OR NEW.max_in_flight > 10000 THEN
        RAISE EXCEPTION 'invalid handler "%": field "max_in_flight": must be between 1 and 10000 (got %)', NEW.name, coalesce(NEW.max_in_flight::text, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.rate_limit_per_s IS NULL OR NEW.rate_limit_per_s < 0 OR NEW.rate_limit_per_s > 100000 THEN
        RAISE EXCEPTION 'invalid handler "%": field "rate_limit_per_s": must be between 0 (no limit) and 100000 attempts per second (got %)', NEW.name, coalesce(NEW.rate_limit_per_s::text, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.give_up_on IS NULL OR array_position(NEW.give_up_on, NULL) IS NOT NULL OR cardinality(NEW.give_up_on) > 100 THEN
        RAISE EXCEPTION 'invalid handler "%": field "give_up_on": must be a list of at most 100 codes, none of them NULL (got %)', NEW.name, coalesce(NEW.give_up_on::text, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.kind = 'http' AND EXISTS (SELECT 1 FROM unnest(NEW.give_up_on) c WHERE c < 400 OR c > 599 OR c = 410) THEN
        RAISE EXCEPTION 'invalid handler "%": field "give_up_on": HTTP statuses must be between 400 and 599, and not 410, which pauses the handler (got %)', NEW.name, NEW.give_up_on::text
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.kind = 'script' AND EXISTS (SELECT 1 FROM unnest(NEW.give_up_on) c WHERE c < 1 OR c > 255) THEN
        RAISE EXCEPTION 'invalid handler "%": field "give_up_on": exit codes must be between 1 and 255 (got %)', NEW.name, NEW.give_up_on::text
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.priority IS NULL THEN
        RAISE EXCEPTION 'invalid handler "%": field "priority": must not be NULL', NEW.name
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.format IS NULL OR NEW.format NOT IN ('jerasoft', 'full') THEN
        RAISE EXCEPTION 'invalid handler "%": field "format": unknown payload format %; expected jerasoft or full', NEW.name, coalesce(quote_literal(NEW.format), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.retry_schedule_ms IS NOT NULL THEN
        IF cardinality(NEW.retry_schedule_ms) > 100 THEN
            RAISE EXCEPTION 'invalid handler "%": field "retry_schedule_ms": at most 100 retries (got %)', NEW.name, cardinality(NEW.retry_schedule_ms)
                USING ERRCODE = 'check_violation';
        END IF;
        IF EXISTS (SELECT 1 FROM unnest(NEW.retry_schedule_ms) d WHERE d IS NULL OR d < 0 OR d > 7 * 86400000) THEN
            RAISE EXCEPTION 'invalid handler "%": field "retry_schedule_ms": every delay must be between 0 and 604800000 ms (7 days)', NEW.name
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF NEW.headers IS NULL OR jsonb_typeof(NEW.headers) <> 'object'
       OR EXISTS (SELECT 1 FROM jsonb_each(NEW.headers) h WHERE jsonb_typeof(h.value) <> 'string' OR h.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$') THEN
        RAISE EXCEPTION 'invalid handler "%": field "headers": must be a JSON object of header-name -> string value', NEW.name
            USING ERRCODE = 'check_violation';
    END IF;
    -- One secret, or (while rotating) several separated by spaces: each request is signed with each.
    IF NEW.secret IS NOT NULL AND (btrim(NEW.secret, E' \t\r\n') = ''
        OR EXISTS (SELECT 1 FROM regexp_split_to_table(btrim(NEW.secret, E' \t\r\n'), '\s+') k WHERE length(k) < 8)) THEN
        RAISE EXCEPTION 'invalid handler "%": field "secret": too short (at least 8 characters per secret; whsec_<base64> recommended)', NEW.name
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.secret IS NOT NULL AND cardinality(regexp_split_to_array(btrim(NEW.secret, E' \t\r\n'), '\s+')) > 5 THEN
        RAISE EXCEPTION 'invalid handler "%": field "secret": at most 5 secrets (separated by spaces, for rotation)', NEW.name
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.events IS NULL OR cardinality(NEW.events) = 0 THEN
        RAISE EXCEPTION 'invalid handler "%": field "events": at least one event name or pattern is required', NEW.name
            USING ERRCODE = 'check_violation';
    END IF;
    FOREACH e IN ARRAY NEW.events LOOP
        IF e IS NULL OR NOT provisioning.event_pattern_known(e) THEN
            bad := coalesce(quote_literal(e), 'NULL');
            RAISE EXCEPTION 'invalid handler "%": field "events": unknown event %', NEW.name, bad
                USING ERRCODE = 'check_violation',
                      HINT = 'Declared events are listed in provisioning.capture_events; a pattern like clients.* must match at least one of them.';
        END IF;
    END LOOP;
    NEW.updated_at := now();
    RETURN NEW;
END
$fn$;

DROP TRIGGER IF EXISTS validate ON provisioning.handlers;
CREATE TRIGGER validate BEFORE INSERT OR UPDATE ON provisioning.handlers
    FOR EACH ROW EXECUTE FUNCTION provisioning.validate_handler();

-- Running relays cache the handler list; this wakes them when it changes (rare, so NOTIFY is fine).
CREATE OR REPLACE FUNCTION provisioning.handlers_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('provisioning_handlers', '');
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS notify_relays ON provisioning.handlers;
CREATE TRIGGER notify_relays AFTER INSERT OR UPDATE OR DELETE ON provisioning.handlers
    FOR EACH STATEMENT EXECUTE FUNCTION provisioning.handlers_changed();

-- Does an event name match a handler's subscription entry (exact name, 'prefix.*' or '*')?
CREATE OR REPLACE FUNCTION provisioning.event_matches(pattern text, event text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE
        WHEN pattern = '*' THEN true
        WHEN right(pattern, 2) = '.*' THEN starts_with(event, left(pattern, -1))
        ELSE event = pattern
    END
$fn$;

CREATE OR REPLACE FUNCTION provisioning.event_pattern_known(pattern text) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT (pattern = '*' OR pattern !~ '\*' OR right(pattern, 2) = '.*' AND strpos(left(pattern, -2), '*') = 0)
       AND EXISTS (SELECT 1 FROM provisioning.capture_events ce WHERE provisioning.event_matches(pattern, ce.event))
$fn$;

-- Routes: which live handlers each declared event fans out to, and the status its delivery starts
-- in. It is rebuilt whole, in the writer's transaction, whenever handlers or declarations change
-- (both are small and change rarely), and the generated capture functions carry each event's
-- routes as literals: when the routes of an event change, its table's capture functions are
-- rewritten in the same transaction (see rebuild_routes). So capture never matches handlers'
-- patterns nor reads this table per event. Paused handlers are routed (their deliveries are
-- held); disabled and archived ones are not. When a before-stage handler subscribes, only the
-- first before-stage delivery starts pending; the rest of the chain and every after-stage delivery
-- wait for its decision.
CREATE TABLE IF NOT EXISTS provisioning.routes (
    event          text NOT NULL,
    priority       int NOT NULL,
    handler_id     bigint NOT NULL,
    stage          text NOT NULL,
    initial_status text NOT NULL,
    PRIMARY KEY (event, priority, handler_id)
);

-- Each event's routes in delivery order, as one JSON value (to tell which events' routes changed).
CREATE OR REPLACE FUNCTION provisioning.routes_by_event() RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(jsonb_object_agg(event, routes), '{}')
      FROM (SELECT event, jsonb_agg(jsonb_build_array(handler_id, stage, priority, initial_status)
                                    ORDER BY priority, handler_id) AS routes
              FROM provisioning.routes GROUP BY event) r
$fn$;

CREATE OR REPLACE FUNCTION provisioning.rebuild_routes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_before jsonb;
    v_after  jsonb;
    r        record;
BEGIN
    -- One rebuilder at a time; it then reads the handlers and declarations as committed (a fresh
    -- snapshot per statement), so two concurrent handler changes cannot leave stale routes.
    -- Capture never takes this lock.
    LOCK TABLE provisioning.routes IN SHARE ROW EXCLUSIVE MODE;
    v_before := provisioning.routes_by_event();
    DELETE FROM provisioning.routes;
    INSERT INTO provisioning.routes (event, priority, handler_id, stage, initial_status)
    SELECT s.event, s.priority, s.id, s.stage,
           CASE WHEN NOT s.chain THEN 'pending'
                WHEN s.stage = 'before' AND s.rank = 1 THEN 'pending'
                ELSE 'waiting' END
      FROM (SELECT ce.event, h.id, h.stage, h.priority,
                   bool_or(h.stage = 'before') OVER (PARTITION BY ce.event) AS chain,
                   row_number() OVER (PARTITION BY ce.event, h.stage ORDER BY h.priority, h.id) AS rank
              FROM (SELECT DISTINCT event FROM provisioning.capture_events) ce
              JOIN provisioning.handlers h
                ON h.status IN ('enabled', 'paused')
               AND EXISTS (SELECT 1 FROM unnest(h.events) p WHERE provisioning.event_matches(p, ce.event))) s;
    -- The capture functions of the events whose routes changed carry the old routes: rewrite them
    -- (only their bodies: no lock on the captured tables, so a handler change never waits for, nor
    -- blocks, the application's writes). Writers run the new code from their next statement on.
    v_after := provisioning.routes_by_event();
    IF v_before IS DISTINCT FROM v_after THEN
        FOR r IN SELECT DISTINCT relation, operation FROM provisioning.capture_events
                  WHERE (v_before -> event) IS DISTINCT FROM (v_after -> event)
                  ORDER BY relation, operation LOOP
            PERFORM provisioning.generate_capture(r.relation, r.operation, true);
        END LOOP;
    END IF;
    RETURN NULL;
END
$fn$;

-- Taken before the statement's row locks too, so that two writers of handlers (say an operator's
-- transaction and a relay pausing a handler on 410) always lock in the same order: no deadlock.
CREATE OR REPLACE FUNCTION provisioning.lock_routes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    LOCK TABLE provisioning.routes IN SHARE ROW EXCLUSIVE MODE;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS lock_routes ON provisioning.handlers;
CREATE TRIGGER lock_routes BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON provisioning.handlers
    FOR EACH STATEMENT EXECUTE FUNCTION provisioning.lock_routes();
DROP TRIGGER IF EXISTS rebuild_routes ON provisioning.handlers;
CREATE TRIGGER rebuild_routes AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON provisioning.handlers
    FOR EACH STATEMENT EXECUTE FUNCTION provisioning.rebuild_routes();
-- Routes depend on which events are declared, not on how: generate_capture() storing a compiled
-- test (UPDATE OF compiled_test) must not rebuild them.
DROP TRIGGER IF EXISTS lock_routes ON provisioning.capture_events;
CREATE TRIGGER lock_routes BEFORE INSERT OR UPDATE OF event OR DELETE OR TRUNCATE ON provisioning.capture_events
    FOR EACH STATEMENT EXECUTE FUNCTION provisioning.lock_routes();
DROP TRIGGER IF EXISTS rebuild_routes ON provisioning.capture_events;
CREATE TRIGGER rebuild_routes AFTER INSERT OR UPDATE OF event OR DELETE OR TRUNCATE ON provisioning.capture_events
    FOR EACH STATEMENT EXECUTE FUNCTION provisioning.rebuild_routes();

------------------------------------------------------------------------------------------------------
-- The outbox: events (append-only) and deliveries (the work queue, one row per event x handler).
------------------------------------------------------------------------------------------------------

-- Events are written by capture triggers and never updated on the hot path. Only the primary key
-- is maintained per insert (plus a BRIN on time, nearly free), to keep capture cheap.
CREATE TABLE IF NOT EXISTS provisioning.events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    entity      text NOT NULL,
    object_id   jsonb NOT NULL,              -- key value as JSON (a number for integer keys)
    operation   text NOT NULL,               -- insert | update | delete
    data        jsonb NOT NULL,              -- the payload's "data"
    old_row     jsonb,                       -- full row image before the change (update, delete)
    new_row     jsonb,                       -- full row image after the change (insert, update)
    relation    text NOT NULL,               -- source table
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- before-stage outcome: NULL (none or pending), 'allowed', 'modified', 'forbidden', 'conflict',
    -- 'failed', 'dead'; and the data as modified (what after-stage handlers and replays receive)
    decision        text,
    decision_reason text,
    decided_data    jsonb
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
ALTER TABLE provisioning.events ADD COLUMN IF NOT EXISTS decided_data jsonb;
ALTER TABLE provisioning.capture_events ADD COLUMN IF NOT EXISTS compiled_condition text;
-- The test the generated capture code runs for the event (its condition and, for data shape
-- 'changed', the column comparison, checked as a whole), as generate_capture() last compiled it;
-- '' = always. Kept so that a routing change can rewrite the capture functions without compiling
-- the tests again (which takes a lock on the captured table).
ALTER TABLE provisioning.capture_events ADD COLUMN IF NOT EXISTS compiled_test text;
-- The column numbers of the key, the JSON column and the excluded columns, beside their names: an
-- ALTER TABLE that renames one of them is followed (follow_column_renames), so capture keeps the
-- same key, JSON column and exclusions under the new names. (NULL: not known, e.g. the table was
-- renamed before this column existed.)
ALTER TABLE provisioning.captures ADD COLUMN IF NOT EXISTS key_attnum int2;
ALTER TABLE provisioning.capture_events ADD COLUMN IF NOT EXISTS json_attnum int2;
ALTER TABLE provisioning.capture_events ADD COLUMN IF NOT EXISTS exclude_attnums int2[];
CREATE INDEX IF NOT EXISTS events_changed_at ON provisioning.events USING brin (changed_at);

-- The work queue. Succeeded deliveries are deleted (their record lives on in provisioning.attempts),
-- so the table stays the size of the backlog plus dead letters. Claims and completions are HOT-
-- unfriendly by design (status is in partial-index predicates), so autovacuum is tuned aggressively.
CREATE TABLE IF NOT EXISTS provisioning.deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         bigint NOT NULL,
    handler_id       bigint NOT NULL,
    stage            text NOT NULL,          -- copied from the handler at capture time
    priority         int NOT NULL,
    entity           text NOT NULL,          -- (handler, entity, object_key) is the ordering key
    object_key       text NOT NULL,
    -- waiting: held behind a before-stage; pending: claimable when due; running: leased by a relay;
    -- dead: retries exhausted (kept until replayed or pruned); skipped: forbidden/conflict upstream
    status           text NOT NULL DEFAULT 'pending',
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_token      bigint,
    lease_expires_at timestamptz,
    data             jsonb,                  -- data as modified by before-stage handlers (NULL = event's)
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.02,
        autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0.02);
-- No CHECK on status: only this file's functions and the relay write it, and PostgreSQL reads and
-- prepares a CHECK constraint again in every statement that inserts a row. In a capture trigger
-- that was ~40,000 of the ~450,000 instructions an emitted event costs the writer's transaction
-- (bench/capture_instructions.sh).
ALTER TABLE provisioning.deliveries DROP CONSTRAINT IF EXISTS deliveries_status;

-- Claim: per handler, earliest due first, only claimable rows (index = size of the backlog). The
-- scan stops at the first delivery not yet due, so retries waiting for later cost nothing, and
-- rows in flight or dead are not in it. (An index on (handler_id, id) lost to the primary key in
-- the planner, which then walked every running and dead delivery on each claim: 4.5 ms for 2 rows
-- behind 5,000 in flight, against 0.23 ms with this one.)
CREATE INDEX IF NOT EXISTS deliveries_due ON provisioning.deliveries (handler_id, next_attempt_at, id)
    WHERE status = 'pending';
DROP INDEX IF EXISTS provisioning.deliveries_claim;
-- Per-object order: is there an earlier unfinished delivery for this handler and object?
CREATE INDEX IF NOT EXISTS deliveries_order ON provisioning.deliveries (handler_id, entity, object_key, id)
    WHERE status IN ('waiting', 'pending', 'running');
-- While an event's before-stage is unresolved, later events of the same object wait (all handlers).
CREATE INDEX IF NOT EXISTS deliveries_before_hold ON provisioning.deliveries (entity, object_key, event_id)
    WHERE stage = 'before' AND status IN ('waiting', 'pending', 'running');
-- Lease recovery.
CREATE INDEX IF NOT EXISTS deliveries_leases ON provisioning.deliveries (lease_expires_at) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS deliveries_event ON provisioning.deliveries (event_id);

-- The execution log: one row per attempt, append-only; pruned by age in small batches.
CREATE TABLE IF NOT EXISTS provisioning.attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   bigint NOT NULL,
    event_id      bigint NOT NULL,
    handler_id    bigint NOT NULL,
    handler_name  text NOT NULL,
    event_name    text NOT NULL,
    object_id     text NOT NULL,
    attempt       int NOT NULL,
    started_at    timestamptz NOT NULL,
    duration_ms   double precision NOT NULL,
    outcome       text NOT NULL,             -- success | fail
    http_status   int,
    exit_code     int,
    request_body  text NOT NULL,
    response      text,                      -- truncated
    error         text,
    relay         text NOT NULL
) WITH (autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX IF NOT EXISTS attempts_delivery ON provisioning.attempts (delivery_id);
CREATE INDEX IF NOT EXISTS attempts_started_at ON provisioning.attempts USING brin (started_at);

-- Live relays (heartbeat) and the doorbell: a capture trigger NOTIFYs only while some relay
-- has declared itself asleep. A busy relay never gets (or pays for) notifications, so capture
-- does not take the cluster-wide NOTIFY commit lock under load. A poll is the safety net.
CREATE UNLOGGED TABLE IF NOT EXISTS provisioning.relays (
    name         text PRIMARY KEY,
    sleeping     boolean NOT NULL DEFAULT false,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
-- The relay's open circuit breakers (handlers whose deliveries it holds while their receiver
-- looks down): [{"handler_id": .., "since": .., "next_probe_at": ..}], for relay status.
ALTER TABLE provisioning.relays ADD COLUMN IF NOT EXISTS circuits jsonb NOT NULL DEFAULT '[]';

------------------------------------------------------------------------------------------------------
-- Capture. For every watched table and operation, declare_event() generates a trigger
-- (prov_capture_insert / _update / _delete) and its own PL/pgSQL function, rebuilt from
-- provisioning.capture_events whenever a declaration changes. (Update events may be split into
-- column-specific triggers prov_capture_update_01, _02, ...: see generate_capture().)
--
--   IF <an unusual search_path> THEN ... (the same events with a safe path) END IF;
--   IF <condition of the first event> THEN <write it and its deliveries> END IF;  -- position order
--   IF <condition of the second event> THEN ... END IF;
--
-- Why one generated function rather than one WHEN trigger per event: PostgreSQL re-reads and
-- prepares every trigger's WHEN clause for every statement, which cost each single-row UPDATE of
-- `clients` ~40 us with the 5 update events of the VCS preset; PL/pgSQL keeps the compiled IF
-- expressions for the session. The conditions are static code (no dynamic SQL per row), checked at
-- declaration time by the SQL parser (a throwaway WHEN trigger) and stored deparsed with
-- schema-qualified names, so they mean the same whatever the search_path of the writer.
--
-- Writing an event is one statement, inlined in the generated function with everything known at
-- generation time as literals, its routes (handlers, order, starting status) included: insert the
-- event, insert its deliveries, and ring the doorbell if a relay sleeps. The functions are
-- generated again when declarations change and, body only, when routes do (rebuild_routes). (A
-- shared emit() function called per event cost ~90 us an event: a function call, an IF chain, and
-- three statements each started by the executor.)
--
-- The generated functions are SECURITY DEFINER: application roles that change captured tables
-- need no privileges on the provisioning schema, and cannot write events themselves (nor call the
-- generated functions: EXECUTE is revoked from PUBLIC). See the generated body for how the
-- conditions are kept safe from a writer's search_path.
------------------------------------------------------------------------------------------------------

-- Superseded by the inlined writes of the generated functions (regenerated at the end of this file).
DROP FUNCTION IF EXISTS provisioning.emit(text, text, text, text, text, text[], text, jsonb, jsonb, text);

-- How captures, capture_events and events name a table: schema-qualified and quoted, whatever the
-- search_path (regclass::text would drop the schema when it is on the search_path).
CREATE OR REPLACE FUNCTION provisioning.relation_name(p_table regclass) RETURNS text
LANGUAGE sql STABLE AS $fn$
    SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table
$fn$;

-- The generated capture function of a table and operation, e.g. provisioning.capture_update_clients_1a2b3c4d
-- (the hash tells apart tables of the same name in different schemas).
CREATE OR REPLACE FUNCTION provisioning.capture_function(p_relation text, p_operation text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT format('capture_%s_%s_%s', p_operation,
                  left(trim(both '_' from regexp_replace(lower(p_relation), '^.*\.|[^a-z0-9_]+', '_', 'g')), 30),
                  left(md5(p_relation), 8))
$fn$;

-- Target of the throwaway triggers that check conditions; never fires.
CREATE OR REPLACE FUNCTION provisioning.condition_check() RETURNS trigger
LANGUAGE plpgsql AS $fn$ BEGIN RETURN NULL; END $fn$;

-- Check a condition the way PostgreSQL checks a trigger's WHEN clause (syntax, columns, types,
-- boolean result, no old.* on insert, no new.* on delete), resolved with the caller's search_path,
-- and return it deparsed with every name it needs schema-qualified. Raises 'event <name>: ...'.
CREATE OR REPLACE FUNCTION provisioning.compile_condition(p_event text, p_table regclass, p_operation text, p_condition text)
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    v_oid oid;
    v_def text;
BEGIN
    BEGIN
        EXECUTE format('CREATE TRIGGER prov_condition_check AFTER %s ON %s FOR EACH ROW WHEN (%s) EXECUTE FUNCTION provisioning.condition_check()',
                       upper(p_operation), p_table, p_condition);
    EXCEPTION WHEN lock_not_available OR query_canceled OR deadlock_detected THEN
        -- the condition may be fine: the throwaway trigger needs a lock on the table
        RAISE EXCEPTION 'event %: cannot check the condition on %: %', p_event, p_table, SQLERRM
            USING ERRCODE = SQLSTATE,
                  HINT = 'Checking a condition takes a SHARE ROW EXCLUSIVE lock on the table, which waits for its open write transactions; try again when they have finished.';
    WHEN others THEN
        RAISE EXCEPTION 'event %: invalid condition on %: %', p_event, p_table, SQLERRM
            USING HINT = 'The condition must be a boolean SQL expression over old.<column> and new.<column> (old is not available for insert, new not for delete).';
    END;
    SELECT oid INTO v_oid FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'prov_condition_check';
    v_def := provisioning.deparse_condition(v_oid);
    EXECUTE format('DROP TRIGGER prov_condition_check ON %s', p_table);
    RETURN v_def;
END
$fn$;

-- The WHEN clause of a trigger, deparsed with an empty search_path: every name it uses that is not
-- in pg_catalog comes out schema-qualified.
CREATE OR REPLACE FUNCTION provisioning.deparse_condition(p_trigger oid) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_def  text := pg_get_triggerdef(p_trigger);
    v_from int  := position(' FOR EACH ROW WHEN (' IN v_def) + length(' FOR EACH ROW WHEN (');
    v_tail text := ') EXECUTE FUNCTION provisioning.condition_check()';
BEGIN
    IF v_from = length(' FOR EACH ROW WHEN (') OR right(v_def, length(v_tail)) <> v_tail THEN
        RAISE EXCEPTION 'cannot read back the condition of trigger %: %', p_trigger, v_def;
    END IF;
    RETURN substr(v_def, v_from, length(v_def) - length(v_tail) - v_from + 1);
END
$fn$;

-- "Something other than the excluded columns changed", for data shape 'changed': one row
-- comparison over the table's current columns. Types without equality compare as jsonb (json) or
-- text (xml, geometric types); generated columns are left out.
CREATE OR REPLACE FUNCTION provisioning.changed_comparison(p_table regclass, p_exclude text[]) RETURNS text
LANGUAGE sql STABLE AS $fn$
    SELECT format('ROW(%s) IS DISTINCT FROM ROW(%s)',
                  string_agg(format(cast_to, 'old.' || quote_ident(attname)), ', ' ORDER BY attnum),
                  string_agg(format(cast_to, 'new.' || quote_ident(attname)), ', ' ORDER BY attnum))
      FROM (SELECT attname, attnum,
                   CASE WHEN atttypid = 'json'::regtype THEN '%s::jsonb'
                        WHEN atttypid IN ('xml'::regtype, 'point'::regtype, 'line'::regtype, 'lseg'::regtype, 'box'::regtype,
                                          'path'::regtype, 'polygon'::regtype, 'circle'::regtype) THEN '%s::text'
                        ELSE '%s' END AS cast_to
              FROM pg_attribute
             WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
               AND NOT (attname = ANY (coalesce(p_exclude, '{}')))) cols
$fn$;

-- The statement a generated capture function runs to write one event: the event, its deliveries
-- (one per route of the event, as provisioning.routes holds them now), and the doorbell if a relay
-- sleeps (one NOTIFY per transaction at most: identical notifications fold). An event nobody is
-- subscribed to is only stored (for replays). Everything but the row images is a literal: the
-- routes too (bench/capture_instructions.sh: reading them from provisioning.routes cost each event
-- ~44,000 instructions, +397,846 against +354,230). Every name is schema-qualified and every
-- operator spelled OPERATOR(pg_catalog.x): the statement runs as the schema owner, planned with
-- the writer's search_path.
CREATE OR REPLACE FUNCTION provisioning.event_write(
    p_event text, p_entity text, p_key_column text, p_shape text, p_json_column text, p_exclude text[],
    p_operation text, p_relation text) RETURNS text
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    v_routes text;
    v_row  text := CASE WHEN p_operation = 'delete' THEN 'prov_old' ELSE 'prov_new' END;
    v_key  text := format('(%s OPERATOR(pg_catalog.->) %L::pg_catalog.text)', v_row, p_key_column);
    v_data text;
    v_jn   text := format('(prov_new OPERATOR(pg_catalog.->) %L::pg_catalog.text)', p_json_column);
    v_jo   text := format('(prov_old OPERATOR(pg_catalog.->) %L::pg_catalog.text)', p_json_column);
BEGIN
    IF p_shape = 'row' THEN
        v_data := v_row;
    ELSIF p_shape = 'empty' OR p_operation <> 'update' THEN
        v_data := '''{}''::pg_catalog.jsonb';
    ELSIF p_shape = 'changed' THEN
        -- key + every column whose value changed, excluded columns left out
        v_data := format('(SELECT pg_catalog.jsonb_build_object(%L::pg_catalog.text, %s) OPERATOR(pg_catalog.||) '
                         'COALESCE(pg_catalog.jsonb_object_agg(n.key, n.value), ''{}''::pg_catalog.jsonb) '
                         'FROM pg_catalog.jsonb_each(prov_new) n '
                         'WHERE n.value IS DISTINCT FROM (prov_old OPERATOR(pg_catalog.->) n.key) '
                         'AND NOT (n.key OPERATOR(pg_catalog.=) ANY (%L::pg_catalog.text[])))',
                         p_key_column, v_key, coalesce(p_exclude, '{}'));
    ELSE
        -- json_keys: key + {json column: {changed key: new value, or null when removed}}
        v_data := format('(SELECT pg_catalog.jsonb_build_object(%L::pg_catalog.text, %s, %L::pg_catalog.text, '
                         'COALESCE(pg_catalog.jsonb_object_agg(k.key, %s OPERATOR(pg_catalog.->) k.key), ''{}''::pg_catalog.jsonb)) '
                         'FROM (SELECT pg_catalog.jsonb_object_keys(CASE WHEN pg_catalog.jsonb_typeof(%s) OPERATOR(pg_catalog.=) ''object''::pg_catalog.text THEN %s ELSE ''{}''::pg_catalog.jsonb END) AS key '
                         'UNION SELECT pg_catalog.jsonb_object_keys(CASE WHEN pg_catalog.jsonb_typeof(%s) OPERATOR(pg_catalog.=) ''object''::pg_catalog.text THEN %s ELSE ''{}''::pg_catalog.jsonb END)) k '
                         'WHERE (%s OPERATOR(pg_catalog.->) k.key) IS DISTINCT FROM (%s OPERATOR(pg_catalog.->) k.key))',
                         p_key_column, v_key, p_json_column, v_jn, v_jn, v_jn, v_jo, v_jo, v_jn, v_jo);
    END IF;
    -- in delivery order: the deliveries of one event get their ids in the order of the routes
    SELECT string_agg(format('(%s::pg_catalog.int8, %L::pg_catalog.text, %s::pg_catalog.int4, %L::pg_catalog.text)',
                             r.handler_id, r.stage, r.priority, r.initial_status), ', ' ORDER BY r.priority, r.handler_id)
      INTO v_routes
      FROM provisioning.routes r
     WHERE r.event = p_event;
    IF v_routes IS NULL THEN
        RETURN format(
            E'        INSERT INTO provisioning.events (name, entity, object_id, operation, data, old_row, new_row, relation)\n'
             '        VALUES (%L, %L, COALESCE(%s, ''null''::pg_catalog.jsonb), %L,\n'
             '                %s,\n'
             '                prov_old, prov_new, %L);  -- no handler subscribed when this was generated\n',
            p_event, p_entity, v_key, p_operation, v_data, p_relation);
    END IF;
    RETURN format(
        E'        WITH prov_event AS (\n'
         '                 INSERT INTO provisioning.events (name, entity, object_id, operation, data, old_row, new_row, relation)\n'
         '                 VALUES (%L, %L, COALESCE(%s, ''null''::pg_catalog.jsonb), %L,\n'
         '                         %s,\n'
         '                         prov_old, prov_new, %L)\n'
         '                 RETURNING id),\n'
         '             prov_fanout AS (\n'
         '                 INSERT INTO provisioning.deliveries (event_id, handler_id, stage, priority, entity, object_key, status)\n'
         '                 SELECT prov_event.id, r.handler_id, r.stage, r.priority, %L,\n'
         '                        COALESCE(%s OPERATOR(pg_catalog.#>>) ''{}''::pg_catalog.text[], ''''), r.initial_status\n'
         '                   FROM prov_event,\n'
         '                        (VALUES %s) r (handler_id, stage, priority, initial_status))\n'
         '        SELECT pg_catalog.pg_notify(''provisioning_events'', '''') IS NULL INTO prov_rang\n'
         '         WHERE EXISTS (SELECT 1 FROM provisioning.relays\n'
         '                        WHERE sleeping AND heartbeat_at OPERATOR(pg_catalog.>) (pg_catalog.now() OPERATOR(pg_catalog.-) ''1 minute''::pg_catalog.interval));\n',
        p_event, p_entity, v_key, p_operation, v_data, p_relation, p_entity, v_key, v_routes);
END
$fn$;

-- The columns a compiled condition reads as old.<column> or new.<column>, sorted; NULL when it may
-- read more (the whole row, old or new as a value) or names no column at all. String literals are
-- left out first, so 'new' as a value is not taken for the row.
CREATE OR REPLACE FUNCTION provisioning.condition_columns(p_table regclass, p_condition text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    v_text text := regexp_replace(p_condition, '''([^'']|'''')*''', '''''', 'g');
    v_cols text[];
BEGIN
    IF v_text ~* '\m(old|new)\M(?!\s*\.)' THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(DISTINCT a.attname::text ORDER BY a.attname::text) INTO v_cols
      FROM regexp_matches(v_text, '\m(?:old|new)\s*\.\s*("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)', 'gi') m
      JOIN pg_attribute a ON a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname = CASE WHEN left(m[1], 1) = '"' THEN replace(substr(m[1], 2, length(m[1]) - 2), '""', '"')
                            ELSE lower(m[1]) END;
    RETURN v_cols;
END
$fn$;

-- Column-specific update triggers (AFTER UPDATE OF <columns>) are skipped by PostgreSQL when no
-- listed column is assigned by the UPDATE, so a balance-only UPDATE of `clients` runs only the
-- balance events' trigger (bench/capture_instructions.sh: +63,915 -> +35,798 instructions per
-- quiet update). But a BEFORE UPDATE trigger that changes other columns would go unseen by them,
-- so they are used only while the table (and its partitions) has no BEFORE UPDATE row trigger, and
-- only where the event trigger provisioning_refresh_on_ddl exists (it regenerates the capture when
-- such a trigger is created later; creating it needs a superuser).
CREATE OR REPLACE FUNCTION provisioning.column_triggers_safe(p_table regclass) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'provisioning_refresh_on_ddl' AND evtenabled <> 'D')
       AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                        -- a partition's own BEFORE triggers count too
                        WHERE t.tgrelid IN (SELECT p_table UNION SELECT relid FROM pg_partition_tree(p_table))
                          AND NOT t.tgisinternal
                          AND t.tgfoid NOT IN (SELECT oid FROM pg_proc WHERE pronamespace = 'provisioning'::regnamespace)
                          AND (t.tgtype & 2) <> 0      -- BEFORE
                          AND (t.tgtype & 1) <> 0      -- FOR EACH ROW
                          AND (t.tgtype & 16) <> 0)    -- UPDATE
$fn$;

-- The generated code's search-path guard: does the writer's effective search path start with
-- anything but pg_catalog (a schema listed before it, or a temporary schema)? Declared IMMUTABLE
-- although it reads the search path, deliberately: PL/pgSQL plans the generated
-- "IF provisioning.search_path_is_unusual()" once, the planner folds the call into a constant
-- then, and PL/pgSQL plans that IF again whenever the session's effective search path (temporary
-- schema included) is not the one it was planned with -- the very rule that makes the guard
-- necessary (it re-plans the conditions with the new path too). So the guard costs each row a
-- constant instead of a function call and an array (bench/capture_instructions.sh: a quiet update
-- +33,774 -> +27,110 instructions). The integration test
-- search_path_guard_follows_every_change_of_the_writers_path pins the re-planning down. Not for
-- any other use.
CREATE OR REPLACE FUNCTION provisioning.search_path_is_unusual() RETURNS boolean
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT (pg_catalog.current_schemas(true))[1] OPERATOR(pg_catalog.<>) 'pg_catalog'
$fn$;

-- (Re)generate the capture functions and triggers of one table and operation from its
-- declarations; drop them when none is left. Insert and delete get one trigger each; update gets
-- one trigger per run of consecutive events (in position order) that read the same columns, each
-- listing them (see column_triggers_safe), or a single trigger for all when that is not safe or
-- an event may read any column. Triggers fire in name order, so events keep their positions.
-- p_routes_only (after a routing change, from rebuild_routes): the declarations are unchanged, so
-- take each event's test as last compiled and only rewrite the functions' bodies; if the table's
-- triggers would change, or a test was never stored, do the whole generation after all.
DROP FUNCTION IF EXISTS provisioning.generate_capture(text, text);
CREATE OR REPLACE FUNCTION provisioning.generate_capture(p_relation text, p_operation text,
                                                         p_routes_only boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    v_table   regclass := to_regclass(p_relation);
    v_fn      text := provisioning.capture_function(p_relation, p_operation);
    v_trigger text := 'prov_capture_' || p_operation;
    v_split   boolean;
    v_body    text;
    v_test    text;
    v_cond    text;
    v_changed text;
    v_images  text;
    v_events  text;
    v_emit    text;
    v_cols    text[];
    v_group   int := 0;
    v_groups  text[] := '{}';   -- the events code of each group
    v_gsets   text[] := '{}';   -- each group's columns as a text[] literal ('' = any column)
    v_names   text[] := '{}';   -- each group's trigger name
    v_fns     text[] := '{}';   -- each group's function name
    v_attrs   text[] := '{}';   -- each group's column numbers as pg_trigger.tgattr prints them
    v_collist text[] := '{}';   -- each group's quoted column list ('' = any column)
    v_attr    text;
    v_cols_q  text;
    v_stale   text[];           -- capture triggers of an earlier generation that this one does not use
    v_drop    text;
    v_return  text;
    e         record;
    t         record;
    i         int;
BEGIN
    IF v_table IS NULL AND p_routes_only THEN
        -- Renamed (or dropped) since it was attached: a renamed table's triggers still run these
        -- functions, so keep them (with the routes they have) rather than stop its capture.
        RAISE WARNING 'provisioning: captured table % no longer exists under that name; its capture keeps the handlers it had', p_relation
            USING HINT = 'If it was renamed, SELECT provisioning.follow_table_renames(); moves its capture to the new name.';
        RETURN;
    END IF;
    IF v_table IS NULL THEN
        FOR t IN SELECT proname FROM pg_proc WHERE pronamespace = 'provisioning'::regnamespace
                    AND (proname = v_fn OR proname LIKE v_fn || '\_g%') LOOP
            EXECUTE format('DROP FUNCTION IF EXISTS provisioning.%I() CASCADE', t.proname);
        END LOOP;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM provisioning.capture_events WHERE relation = p_relation AND operation = p_operation)
       AND NOT (has_table_privilege('provisioning.events', 'INSERT') AND has_table_privilege('provisioning.deliveries', 'INSERT')
            AND has_table_privilege('provisioning.routes', 'SELECT') AND has_table_privilege('provisioning.relays', 'SELECT')) THEN
        RAISE EXCEPTION 'cannot generate the capture trigger of %: role % may not write to provisioning.events and provisioning.deliveries', p_relation, current_user
            USING HINT = 'Declare events as the owner of the provisioning schema (the role that ran install.sql).';
    END IF;
    -- One generation at a time, and none while routes change (a handler change rewrites capture
    -- functions too): two transactions replacing the same function would fail.
    LOCK TABLE provisioning.routes IN SHARE ROW EXCLUSIVE MODE;
    v_split := p_operation = 'update' AND provisioning.column_triggers_safe(v_table);
    -- How the generated code returns. The value an AFTER trigger returns is ignored, and PL/pgSQL
    -- returns a row variable as it is, whereas RETURN NULL is an expression that it prepares in
    -- every transaction and evaluates (bench/capture_instructions.sh: a quiet update +27,003 ->
    -- +26,230 instructions with RETURN NEW; an unassigned record variable measured the same).
    v_return := CASE WHEN p_operation = 'delete' THEN 'RETURN OLD;' ELSE 'RETURN NEW;' END;
    -- The row images are built once, and only when an event fires. (prov_imaged starts NULL, not
    -- false: a default is an expression PL/pgSQL prepares again in every transaction, ~1,100
    -- instructions per row by bench/capture_instructions.sh.) Changes the relay makes itself
    -- (before-stage decisions, under provisioning.suppress) emit nothing: that is checked here, when
    -- the first event fires, not on every row: most rows fire nothing, and the test cost each of
    -- them ~3,000 instructions. '/*prov_return*/' becomes the way out of the function: v_return,
    -- or v_return after restoring the writer's search_path (see the guard in the body).
    v_images := format(E'        IF prov_imaged IS NULL THEN\n'
                        '            IF pg_catalog.current_setting(''provisioning.suppress'', true) OPERATOR(pg_catalog.=) ''on'' THEN /*prov_return*/ END IF;\n'
                        '           %s%s prov_imaged := true;\n'
                        '        END IF;\n',
                       CASE WHEN p_operation <> 'insert' THEN ' prov_old := pg_catalog.to_jsonb(OLD);' ELSE '' END,
                       CASE WHEN p_operation <> 'delete' THEN ' prov_new := pg_catalog.to_jsonb(NEW);' ELSE '' END);
    FOR e IN SELECT ce.*, c.entity, c.key_column
               FROM provisioning.capture_events ce JOIN provisioning.captures c USING (relation)
              WHERE ce.relation = p_relation AND ce.operation = p_operation
              ORDER BY ce.position, ce.event LOOP
        IF p_routes_only THEN
            IF e.compiled_test IS NULL THEN
                PERFORM provisioning.generate_capture(p_relation, p_operation, false);
                RETURN;
            END IF;
            v_test := nullif(e.compiled_test, '');
        ELSE
            IF (provisioning.attnums(v_table, ARRAY[e.key_column]))[1] IS NULL THEN
                RAISE EXCEPTION 'event %: key column % of % does not exist', e.event, quote_ident(e.key_column), p_relation
                    USING HINT = format('Attach the table again with its key column: SELECT provisioning.attach(%L, %L, ''<key column>'');',
                                        p_relation, e.entity);
            END IF;
            IF e.data_shape = 'json_keys' AND NOT provisioning.is_json_column(v_table, e.json_column) THEN
                RAISE EXCEPTION 'event %: json column % is not a json/jsonb column of %', e.event, quote_ident(e.json_column), p_relation;
            END IF;
            -- The shapes that report what changed fire only when something did: 'changed' when a
            -- column not excluded did, 'json_keys' when its JSON column did (as jsonb, so key order
            -- and whitespace do not count; without it any other column's update fired it with no
            -- key to report).
            v_changed := NULL;
            IF e.data_shape = 'changed' THEN
                v_changed := provisioning.changed_comparison(v_table, e.exclude_columns);
                IF v_changed IS NULL THEN
                    RAISE EXCEPTION 'event %: every column of % is excluded; nothing could change', e.event, p_relation;
                END IF;
            ELSIF e.data_shape = 'json_keys' THEN
                v_changed := format('old.%1$I::pg_catalog.jsonb IS DISTINCT FROM new.%1$I::pg_catalog.jsonb', e.json_column);
            END IF;
            v_cond := CASE WHEN e.compiled_condition IS NULL THEN v_changed
                           WHEN v_changed IS NULL THEN e.compiled_condition
                           ELSE format('(%s) AND %s', e.compiled_condition, v_changed) END;
            -- checked again as a whole: the table may have changed since the declaration (refresh)
            v_test := NULL;
            IF v_cond IS NOT NULL THEN
                v_test := provisioning.compile_condition(e.event, v_table, p_operation, v_cond);
            END IF;
            IF e.compiled_test IS DISTINCT FROM coalesce(v_test, '') THEN
                UPDATE provisioning.capture_events SET compiled_test = coalesce(v_test, '')
                 WHERE event = e.event AND operation = e.operation;
            END IF;
        END IF;
        v_emit := v_images || provisioning.event_write(e.event, e.entity, e.key_column, e.data_shape, e.json_column,
                                                       e.exclude_columns, p_operation, p_relation);
        IF v_test IS NULL THEN  -- always: no IF to evaluate
            v_events := format(E'    -- %s (position %s, always)\n%s', e.event, e.position,
                               regexp_replace(v_emit, '^    ', '', 'gn'));
        ELSE
            v_events := format(E'    -- %s (position %s)\n    IF %s THEN\n%s    END IF;\n',
                               e.event, e.position, v_test, v_emit);
        END IF;
        -- a new group when this event reads other columns than the previous one
        v_cols := NULL;
        IF v_split AND v_test IS NOT NULL THEN
            v_cols := provisioning.condition_columns(v_table, v_test);
        END IF;
        IF v_group = 0 OR (v_split AND v_gsets[v_group] IS DISTINCT FROM coalesce(v_cols::text, '')) THEN
            v_group := v_group + 1;
            v_groups := v_groups || ''::text;
            v_gsets := v_gsets || CASE WHEN v_split THEN coalesce(v_cols::text, '') ELSE '' END;
        END IF;
        v_groups[v_group] := v_groups[v_group] || v_events;
    END LOOP;

    IF v_group = 1 THEN
        v_names := ARRAY[v_trigger];
        v_fns := ARRAY[v_fn];
    ELSE
        FOR i IN 1 .. v_group LOOP
            v_names := v_names || format('%s_%s', v_trigger, lpad(i::text, 2, '0'));
            v_fns := v_fns || format('%s_g%s', v_fn, i);
        END LOOP;
    END IF;
    FOR i IN 1 .. v_group LOOP
        SELECT coalesce(string_agg(a.attnum::text, ' ' ORDER BY a.attnum), ''),
               coalesce(string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum), '')
          INTO v_attr, v_cols_q
          FROM pg_attribute a
         WHERE a.attrelid = v_table AND a.attname = ANY (nullif(v_gsets[i], '')::text[]);
        v_attrs := v_attrs || v_attr;
        v_collist := v_collist || v_cols_q;
    END LOOP;
    v_stale := ARRAY(SELECT tg.tgname::text FROM pg_trigger tg
                      WHERE tg.tgrelid = v_table AND NOT tg.tgisinternal
                        AND (tg.tgname = v_trigger OR tg.tgname ~ ('^' || v_trigger || '_[0-9]+$'))
                        AND NOT (tg.tgname = ANY (v_names)));
    -- A routing change rewrites function bodies only; trigger DDL (which locks the table) means the
    -- table changed in a way only a whole generation handles.
    IF p_routes_only AND (
           cardinality(v_stale) > 0
        OR EXISTS (SELECT 1 FROM unnest(v_names, v_attrs) AS g(name, attrs)
                    WHERE NOT EXISTS (SELECT 1 FROM pg_trigger tg
                                       WHERE tg.tgrelid = v_table AND tg.tgname = g.name
                                         AND tg.tgattr::text = g.attrs))) THEN
        PERFORM provisioning.generate_capture(p_relation, p_operation, false);
        RETURN;
    END IF;
    -- Our own CREATE TRIGGER must not make the DDL event trigger regenerate this capture again.
    PERFORM set_config('provisioning.generating', 'on', true);
    -- Triggers and functions of an earlier generation that this one does not use.
    FOREACH v_drop IN ARRAY v_stale LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_drop, p_relation);
    END LOOP;
    FOR t IN SELECT proname FROM pg_proc WHERE pronamespace = 'provisioning'::regnamespace
                AND (proname = v_fn OR proname LIKE v_fn || '\_g%') AND NOT (proname = ANY (v_fns)) LOOP
        EXECUTE format('DROP FUNCTION provisioning.%I()', t.proname);
    END LOOP;

    FOR i IN 1 .. v_group LOOP
        -- Everything the generated code names itself is schema-qualified (it runs as the owner).
        -- Every IF costs each transaction a little (PL/pgSQL prepares its expression once per
        -- transaction, ~3,000 instructions for a function call and a comparison), so the common
        -- path has one test before the events: "an unusual search_path?" (The relay's own
        -- changes are recognised only when an event fires: see v_images.)
        v_body := format(E'-- Generated by provisioning.declare_event() from provisioning.capture_events: events on %s of %s%s.\n'
                         '-- Do not edit: declare_event(), drop_event() and refresh() rebuild it.\n'
                         'DECLARE\n    prov_old jsonb;\n    prov_new jsonb;\n    prov_imaged boolean;\n    prov_rang boolean;\n    prov_path text;\n'
                         'BEGIN\n'
                         '    IF provisioning.search_path_is_unusual() THEN\n'
                         '        -- This function runs as the schema owner, but PL/pgSQL plans the conditions with the\n'
                         '        -- writer''s search_path. A path that puts any schema before pg_catalog could redefine\n'
                         '        -- the operators and types they use, so such writers get a safe path for this call. (A\n'
                         '        -- SET clause on the function would do it for every writer, at ~20 us per row.)\n'
                         '        prov_path := pg_catalog.current_setting(''search_path'');\n'
                         '        PERFORM pg_catalog.set_config(''search_path'', ''pg_catalog, pg_temp'', true);\n'
                         '%s'
                         '        PERFORM pg_catalog.set_config(''search_path'', prov_path, true);\n'
                         '        %s\n'
                         '    END IF;\n'
                         '%s'
                         '    %s\n'
                         'END\n',
                         p_operation, p_relation,
                         CASE WHEN v_gsets[i] <> '' THEN format(' (trigger %s: updates that assign any of %s)', v_names[i], v_gsets[i]) ELSE '' END,
                         replace(regexp_replace(v_groups[i], '^(.)', '    \1', 'gn'), '/*prov_return*/',
                                 'PERFORM pg_catalog.set_config(''search_path'', prov_path, true); ' || v_return),
                         v_return,
                         replace(v_groups[i], '/*prov_return*/', v_return),
                         v_return);
        -- SECURITY DEFINER without SET search_path: see the search_path guard in the body.
        EXECUTE format('CREATE OR REPLACE FUNCTION provisioning.%I() RETURNS trigger LANGUAGE plpgsql '
                       'SECURITY DEFINER AS %L', v_fns[i], v_body);
        EXECUTE format('REVOKE ALL ON FUNCTION provisioning.%I() FROM PUBLIC', v_fns[i]);
        -- A trigger is re-created only when its column list changed.
        IF EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = v_table AND tg.tgname = v_names[i]
                      AND tg.tgattr::text IS DISTINCT FROM v_attrs[i]) THEN
            EXECUTE format('DROP TRIGGER %I ON %s', v_names[i], p_relation);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = v_table AND tg.tgname = v_names[i]) THEN
            EXECUTE format('CREATE TRIGGER %I AFTER %s%s ON %s FOR EACH ROW EXECUTE FUNCTION provisioning.%I()',
                           v_names[i], upper(p_operation), coalesce(' OF ' || nullif(v_collist[i], ''), ''), p_relation, v_fns[i]);
        END IF;
    END LOOP;
    PERFORM set_config('provisioning.generating', '', true);
END
$fn$;

-- Whether p_column is a json or jsonb column of p_table (what a json_keys event reports on).
CREATE OR REPLACE FUNCTION provisioning.is_json_column(p_table regclass, p_column text) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = p_column AND attnum > 0
                      AND NOT attisdropped AND atttypid IN ('json'::regtype, 'jsonb'::regtype))
$fn$;

-- The column numbers of p_columns in p_table, in order (NULL for a name that is not a column).
CREATE OR REPLACE FUNCTION provisioning.attnums(p_table regclass, p_columns text[]) RETURNS int2[]
LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(array_agg(a.attnum ORDER BY x.ord), '{}')
      FROM unnest(p_columns) WITH ORDINALITY x(name, ord)
      LEFT JOIN pg_attribute a ON a.attrelid = p_table AND a.attname = x.name AND a.attnum > 0 AND NOT a.attisdropped
$fn$;

-- After an ALTER TABLE of a captured table: the key, JSON and excluded columns that were renamed
-- take their new names (found by column number). A dropped one keeps its old name: generation then
-- refuses a missing key or JSON column, and a missing excluded column no longer matters.
CREATE OR REPLACE FUNCTION provisioning.follow_column_renames(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE v_rel text := provisioning.relation_name(p_table);
BEGIN
    UPDATE provisioning.captures c SET key_column = a.attname
      FROM pg_attribute a
     WHERE c.relation = v_rel AND a.attrelid = p_table AND a.attnum = c.key_attnum AND NOT a.attisdropped
       AND a.attname <> c.key_column;
    UPDATE provisioning.capture_events e SET json_column = a.attname
      FROM pg_attribute a
     WHERE e.relation = v_rel AND a.attrelid = p_table AND a.attnum = e.json_attnum AND NOT a.attisdropped
       AND a.attname <> e.json_column;
    UPDATE provisioning.capture_events e
       SET exclude_columns = (SELECT array_agg(coalesce(a.attname::text, x.name) ORDER BY x.ord)
                                FROM unnest(e.exclude_columns, e.exclude_attnums) WITH ORDINALITY x(name, num, ord)
                                LEFT JOIN pg_attribute a ON a.attrelid = p_table AND a.attnum = x.num AND NOT a.attisdropped)
     WHERE e.relation = v_rel AND cardinality(e.exclude_columns) > 0
       AND cardinality(e.exclude_attnums) = cardinality(e.exclude_columns)
       AND EXISTS (SELECT 1 FROM unnest(e.exclude_columns, e.exclude_attnums) x(name, num)
                     JOIN pg_attribute a ON a.attrelid = p_table AND a.attnum = x.num AND NOT a.attisdropped
                    WHERE a.attname <> x.name);
END
$fn$;

-- Attach capture to a table: names the entity (object kind) and the key column.
CREATE OR REPLACE FUNCTION provisioning.attach(p_table regclass, p_entity text, p_key_column text DEFAULT 'id')
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE v_prev provisioning.captures;
BEGIN
    IF p_entity IS NULL OR p_entity !~ '^[a-z_][a-z0-9_.]*$' THEN
        RAISE EXCEPTION 'cannot attach capture to %: entity % must be lower-case letters, digits, _ or .', p_table, coalesce(quote_literal(p_entity), 'NULL');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = p_key_column AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'cannot attach capture to %: key column % does not exist', p_table, quote_ident(p_key_column);
    END IF;
    SELECT * INTO v_prev FROM provisioning.captures WHERE relation = provisioning.relation_name(p_table);
    INSERT INTO provisioning.captures (relation, entity, key_column, key_attnum)
    VALUES (provisioning.relation_name(p_table), p_entity, p_key_column, (provisioning.attnums(p_table, ARRAY[p_key_column]))[1])
    ON CONFLICT (relation) DO UPDATE SET entity = EXCLUDED.entity, key_column = EXCLUDED.key_column,
                                         key_attnum = EXCLUDED.key_attnum;
    -- re-attached with another entity or key: the generated functions carry both as literals
    IF v_prev.relation IS NOT NULL AND (v_prev.entity, v_prev.key_column) IS DISTINCT FROM (p_entity, p_key_column) THEN
        PERFORM provisioning.refresh(p_table);
    END IF;
END
$fn$;

-- Declare (or redeclare) one event on an attached table and regenerate the table's capture
-- trigger. A broken condition, an unknown table or column fails here, naming the event.
--   p_operation:  insert | update | delete
--   p_condition:  SQL over old.<col> / new.<col>, or NULL for "always"
--   p_data:       row | changed | json_keys | empty
--   p_exclude:    (changed) columns whose change alone does not fire the event and is not reported
--   p_json_column:(json_keys) the JSON column whose changed keys are reported
--   p_position:   order among the events of one row change (ties: by event name)
CREATE OR REPLACE FUNCTION provisioning.declare_event(
    p_event text, p_table regclass, p_operation text, p_condition text DEFAULT NULL,
    p_data text DEFAULT 'row', p_exclude text[] DEFAULT '{}', p_json_column text DEFAULT NULL,
    p_position int DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    c        provisioning.captures;
    v_pos    int;
    v_col    text;
    v_cond   text := nullif(btrim(p_condition), '');
    v_compiled text;
    v_old    provisioning.capture_events;
BEGIN
    IF p_event IS NULL OR p_event !~ '^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+$' THEN
        RAISE EXCEPTION 'event %: the name must be dotted lower-case words like clients.update', coalesce(quote_literal(p_event), 'NULL');
    END IF;
    SELECT * INTO c FROM provisioning.captures WHERE relation = provisioning.relation_name(p_table);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event %: table % has no capture attached', p_event, p_table
            USING HINT = format('Run SELECT provisioning.attach(%L, ''<entity>'', ''<key column>'') first.', p_table::text);
    END IF;
    IF p_operation IS NULL OR p_operation NOT IN ('insert', 'update', 'delete') THEN
        RAISE EXCEPTION 'event %: unknown operation %; expected insert, update or delete', p_event, coalesce(quote_literal(p_operation), 'NULL');
    END IF;
    IF p_data IS NULL OR p_data NOT IN ('row', 'changed', 'json_keys', 'empty') THEN
        RAISE EXCEPTION 'event %: unknown data shape %; expected row, changed, json_keys or empty', p_event, coalesce(quote_literal(p_data), 'NULL');
    END IF;
    IF p_data = 'changed' AND p_operation <> 'update' THEN
        RAISE EXCEPTION 'event %: data shape "changed" needs operation update', p_event;
    END IF;
    IF p_data = 'json_keys' THEN
        IF p_operation <> 'update' THEN
            RAISE EXCEPTION 'event %: data shape "json_keys" needs operation update', p_event;
        END IF;
        IF NOT provisioning.is_json_column(p_table, p_json_column) THEN
            RAISE EXCEPTION 'event %: json column % is not a json/jsonb column of %', p_event, coalesce(quote_ident(p_json_column), 'NULL'), p_table;
        END IF;
    END IF;
    FOREACH v_col IN ARRAY coalesce(p_exclude, '{}') LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = v_col AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'event %: excluded column % does not exist in %', p_event, quote_ident(v_col), p_table;
        END IF;
    END LOOP;
    IF p_data = 'changed' AND provisioning.changed_comparison(p_table, p_exclude) IS NULL THEN
        RAISE EXCEPTION 'event %: every column of % is excluded; nothing could change', p_event, p_table;
    END IF;
    -- resolved now, with the caller's search_path, and stored deparsed (schema-qualified)
    IF v_cond IS NOT NULL THEN
        v_compiled := provisioning.compile_condition(p_event, p_table, p_operation, v_cond);
    END IF;

    SELECT * INTO v_old FROM provisioning.capture_events WHERE event = p_event AND operation = p_operation;
    DELETE FROM provisioning.capture_events WHERE event = p_event AND operation = p_operation;
    IF EXISTS (SELECT 1 FROM provisioning.capture_events WHERE event = p_event AND relation <> c.relation) THEN
        RAISE EXCEPTION 'event %: already declared on another table (%)', p_event,
            (SELECT relation FROM provisioning.capture_events WHERE event = p_event LIMIT 1);
    END IF;
    v_pos := coalesce(p_position, v_old.position,
                      (SELECT coalesce(max(position), 0) + 10 FROM provisioning.capture_events WHERE relation = c.relation));

    INSERT INTO provisioning.capture_events (event, relation, operation, condition, compiled_condition, data_shape,
                                             json_column, exclude_columns, position, trigger_name,
                                             json_attnum, exclude_attnums)
    VALUES (p_event, c.relation, p_operation, v_cond, v_compiled, p_data, p_json_column, coalesce(p_exclude, '{}'),
            v_pos, 'prov_capture_' || p_operation,
            (provisioning.attnums(p_table, ARRAY[p_json_column]))[1], provisioning.attnums(p_table, coalesce(p_exclude, '{}')));
    PERFORM provisioning.generate_capture(c.relation, p_operation);
    IF v_old.relation IS NOT NULL AND v_old.relation <> c.relation THEN
        PERFORM provisioning.generate_capture(v_old.relation, p_operation);
    END IF;
END
$fn$;

-- Remove one event (its table's capture trigger is regenerated without it).
CREATE OR REPLACE FUNCTION provisioning.drop_event(p_event text) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE e provisioning.capture_events;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM provisioning.capture_events WHERE event = p_event) THEN
        RAISE EXCEPTION 'event %: not declared', p_event;
    END IF;
    FOR e IN DELETE FROM provisioning.capture_events WHERE event = p_event RETURNING * LOOP
        PERFORM provisioning.generate_capture(e.relation, e.operation);
    END LOOP;
END
$fn$;

-- Detach capture from a table: drops its capture triggers and functions. User data is untouched.
CREATE OR REPLACE FUNCTION provisioning.detach(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE v_rel text := provisioning.relation_name(p_table); v_op text;
BEGIN
    DELETE FROM provisioning.capture_events WHERE relation = v_rel;
    FOREACH v_op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        PERFORM provisioning.generate_capture(v_rel, v_op);
    END LOOP;
    DELETE FROM provisioning.captures WHERE relation = v_rel;
END
$fn$;

-- Regenerate a table's capture triggers after its columns changed (ALTER TABLE ADD COLUMN: the
-- "changed" comparison lists the columns explicitly, so new columns need this call) or after
-- attach() changed its entity or key.
CREATE OR REPLACE FUNCTION provisioning.refresh(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE v_rel text := provisioning.relation_name(p_table); v_op text;
BEGIN
    FOREACH v_op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        PERFORM provisioning.generate_capture(v_rel, v_op);
    END LOOP;
END
$fn$;

------------------------------------------------------------------------------------------------------
-- Before-stage decisions. A before-stage handler's reply is turned into allow / modify / forbid by
-- the relay; these functions apply it after the fact, in the relay's completion transaction:
-- guarded (the source row must still equal the event's new image, locked), silent (no new events),
-- and never fatal (a failing write-back is recorded on the event, not retried forever).
------------------------------------------------------------------------------------------------------

-- The source row of an event, locked; NULL when it no longer exists.
CREATE OR REPLACE FUNCTION provisioning.lock_source_row(e provisioning.events, c provisioning.captures)
RETURNS jsonb LANGUAGE plpgsql AS $fn$
DECLARE cur jsonb;
BEGIN
    -- The key is compared in its own type (populated from JSON), so the table's index is used.
    EXECUTE format('SELECT to_jsonb(t) FROM %1$s t WHERE t.%2$I = (jsonb_populate_record(NULL::%1$s, $1)).%2$I FOR UPDATE',
                   e.relation, c.key_column)
       INTO cur USING jsonb_build_object(c.key_column, e.object_id);
    RETURN cur;
END
$fn$;

-- Apply a decision to the source row of event e. Returns 'allowed', 'modified', 'forbidden',
-- 'conflict' (the row changed since the event: nothing written) or 'failed' (the write raised an
-- error: nothing written; the reason is stored on the event).
CREATE OR REPLACE FUNCTION provisioning.apply_decision(p_event bigint, p_decision text, p_changes jsonb, p_reason text)
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    e    provisioning.events;
    c    provisioning.captures;
    cur  jsonb;
    cols text;
    setlist text;
    v_result text;
    v_reason text := p_reason;
BEGIN
    SELECT * INTO e FROM provisioning.events WHERE id = p_event FOR UPDATE;
    SELECT * INTO c FROM provisioning.captures WHERE relation = e.relation;
    IF p_decision = 'allow' OR (p_decision = 'modify' AND (p_changes IS NULL OR p_changes = '{}')) THEN
        v_result := 'allowed';
    ELSIF c.relation IS NULL OR to_regclass(e.relation) IS NULL THEN
        v_result := 'failed';
        v_reason := format('source table %s is no longer captured or no longer exists', e.relation);
    ELSE
        -- Changes made here must not be captured as new events.
        PERFORM set_config('provisioning.suppress', 'on', true);
        BEGIN
            cur := provisioning.lock_source_row(e, c);
            IF p_decision = 'modify' AND e.operation = 'delete' THEN
                v_result := 'allowed';
                v_reason := 'modify on a delete: nothing to write back';
            ELSIF e.operation <> 'delete' AND cur IS DISTINCT FROM e.new_row THEN
                v_result := 'conflict';
                v_reason := format('the row changed after the event (now %s); %s not applied',
                                   coalesce(left(cur::text, 500), 'deleted'), p_decision);
            ELSIF e.operation = 'delete' AND cur IS NOT NULL THEN
                v_result := 'conflict';
                v_reason := 'a row with the same key exists again; delete not undone';
            ELSIF p_decision = 'modify' THEN
                SELECT string_agg(format('%1$I = r.%1$I', attname), ', ') INTO setlist
                  FROM pg_attribute
                 WHERE attrelid = e.relation::regclass AND attnum > 0 AND NOT attisdropped
                   AND attgenerated = '' AND attidentity <> 'a' AND p_changes ? attname::text;
                IF setlist IS NOT NULL THEN
                    EXECUTE format('UPDATE %1$s t SET %2$s FROM jsonb_populate_record(NULL::%1$s, $1) r WHERE t.%3$I = r.%3$I',
                                   e.relation, setlist, c.key_column)
                      USING e.new_row || p_changes;
                END IF;
                v_result := 'modified';
            ELSIF e.operation = 'insert' THEN
                EXECUTE format('DELETE FROM %1$s t WHERE t.%2$I = (jsonb_populate_record(NULL::%1$s, $1)).%2$I',
                               e.relation, c.key_column)
                  USING jsonb_build_object(c.key_column, e.object_id);
                v_result := 'forbidden';
            ELSIF e.operation = 'update' THEN
                SELECT string_agg(format('%1$I = r.%1$I', attname), ', ') INTO setlist
                  FROM pg_attribute
                 WHERE attrelid = e.relation::regclass AND attnum > 0 AND NOT attisdropped
                   AND attgenerated = '' AND attidentity <> 'a';
                EXECUTE format('UPDATE %1$s t SET %2$s FROM jsonb_populate_record(NULL::%1$s, $1) r WHERE t.%3$I = (jsonb_populate_record(NULL::%1$s, $2)).%3$I',
                               e.relation, setlist, c.key_column)
                  USING e.old_row, jsonb_build_object(c.key_column, e.object_id);
                v_result := 'forbidden';
            ELSE -- delete: put the row back
                SELECT string_agg(quote_ident(attname), ', ') INTO cols
                  FROM pg_attribute
                 WHERE attrelid = e.relation::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
                EXECUTE format('INSERT INTO %1$s (%2$s) OVERRIDING SYSTEM VALUE SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, $1)',
                               e.relation, cols)
                  USING e.old_row;
                v_result := 'forbidden';
            END IF;
        EXCEPTION WHEN others THEN
            v_result := 'failed';
            v_reason := format('%s could not be applied: %s', p_decision, SQLERRM);
        END;
        PERFORM set_config('provisioning.suppress', '', true);
    END IF;
    UPDATE provisioning.events SET decision = v_result, decision_reason = v_reason WHERE id = p_event;
    RETURN v_result;
END
$fn$;

-- A before-stage delivery succeeded with a decision. Fenced by the claim token (returns 'lost' if
-- this relay no longer owns it). Passes the (possibly modified) data to the next before-stage
-- handler, or — at the end of the chain, or on forbid — applies the decision and releases (or
-- skips) the event's after-stage deliveries. p_data: the data after this handler.
CREATE OR REPLACE FUNCTION provisioning.resolve_before(p_delivery bigint, p_token bigint, p_decision text,
                                                       p_data jsonb, p_reason text)
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    d provisioning.deliveries;
    e provisioning.events;
    v_next bigint;
    v_changes jsonb;
    v_result text;
BEGIN
    DELETE FROM provisioning.deliveries
     WHERE id = p_delivery AND lease_token = p_token AND status = 'running'
    RETURNING * INTO d;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    SELECT * INTO e FROM provisioning.events WHERE id = d.event_id;

    IF p_decision = 'forbid' THEN
        v_result := provisioning.apply_decision(e.id, 'forbid', NULL, p_reason);
        UPDATE provisioning.deliveries
           SET status = 'skipped', updated_at = now(),
               last_error = format('event %s by before-stage handler %s', v_result, d.handler_id)
         WHERE event_id = e.id AND status IN ('waiting', 'pending');
        RETURN v_result;
    END IF;

    SELECT id INTO v_next FROM provisioning.deliveries
     WHERE event_id = e.id AND stage = 'before' AND status IN ('waiting', 'skipped')
     ORDER BY priority, id LIMIT 1;
    IF v_next IS NOT NULL THEN
        UPDATE provisioning.deliveries
           SET status = 'pending', data = p_data, next_attempt_at = now(), last_error = NULL, updated_at = now()
         WHERE id = v_next;
        RETURN 'next';
    END IF;

    SELECT coalesce(jsonb_object_agg(n.key, n.value), '{}') INTO v_changes
      FROM jsonb_each(coalesce(p_data, e.data)) n
     WHERE e.data -> n.key IS DISTINCT FROM n.value;
    v_result := provisioning.apply_decision(e.id, CASE WHEN v_changes = '{}' THEN 'allow' ELSE 'modify' END, v_changes, NULL);
    IF v_result = 'modified' THEN
        UPDATE provisioning.events SET decided_data = p_data WHERE id = e.id;
    END IF;
    IF v_result IN ('allowed', 'modified') THEN
        UPDATE provisioning.deliveries
           SET status = 'pending', data = CASE WHEN v_changes = '{}' THEN NULL ELSE p_data END,
               next_attempt_at = now(), last_error = NULL, updated_at = now()
         WHERE event_id = e.id AND stage = 'after' AND status IN ('waiting', 'skipped');
    ELSE
        UPDATE provisioning.deliveries
           SET status = 'skipped', updated_at = now(), last_error = format('event %s: after-stage not called', v_result)
         WHERE event_id = e.id AND status = 'waiting';
    END IF;
    RETURN v_result;
END
$fn$;

-- A before-stage delivery went dead: the decision is unknown. The change stays (it committed and we
-- cannot know whether it should not have), the event is flagged 'dead', after-stage handlers are
-- not called; retrying the dead delivery resumes the chain.
CREATE OR REPLACE FUNCTION provisioning.before_dead(p_delivery bigint) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE d provisioning.deliveries;
BEGIN
    SELECT * INTO d FROM provisioning.deliveries WHERE id = p_delivery AND status = 'dead';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE provisioning.events
       SET decision = 'dead', decision_reason = format('before-stage handler %s is dead: %s', d.handler_id, d.last_error)
     WHERE id = d.event_id;
    UPDATE provisioning.deliveries
       SET status = 'skipped', updated_at = now(), last_error = 'before-stage handler dead: decision unknown'
     WHERE event_id = d.event_id AND status = 'waiting';
END
$fn$;

-- Captured tables renamed (ALTER TABLE ... RENAME / SET SCHEMA, ALTER SCHEMA ... RENAME) since
-- their capture was generated: move their declarations to the new name and generate their capture
-- under it (the old functions go, with the triggers that ran them, in the same transaction: no
-- change goes uncaptured). A renamed table is found by its triggers, which still run the functions
-- named after the old name. Events waiting for a before-stage decision get the new name too, so
-- that the decision is applied to the table. Returns the tables followed.
CREATE OR REPLACE FUNCTION provisioning.follow_table_renames() RETURNS regclass[]
LANGUAGE plpgsql AS $fn$
DECLARE
    c       provisioning.captures;
    v_table regclass;
    v_new   text;
    v_ops   text[] := ARRAY['insert', 'update', 'delete'];
    v_op    text;
    v_fn    record;
    v_trg   record;
    v_moved regclass[] := '{}';
BEGIN
    FOR c IN SELECT * FROM provisioning.captures WHERE to_regclass(relation) IS NULL ORDER BY relation LOOP
        SELECT t.tgrelid::regclass INTO v_table
          FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
         WHERE p.pronamespace = 'provisioning'::regnamespace AND t.tgparentid = 0
           AND t.tgname LIKE 'prov\_capture\_%'
           AND (p.proname IN (SELECT provisioning.capture_function(c.relation, o) FROM unnest(v_ops) o)
                OR p.proname LIKE provisioning.capture_function(c.relation, 'update') || '\_g%')
         LIMIT 1;
        CONTINUE WHEN v_table IS NULL;  -- dropped, or its capture triggers are gone: nothing to follow
        v_new := provisioning.relation_name(v_table);
        IF EXISTS (SELECT 1 FROM provisioning.captures WHERE relation = v_new) THEN
            RAISE WARNING 'provisioning: % was renamed to %, which has a capture of its own; the old declarations stay under %', c.relation, v_new, c.relation
                USING HINT = format('Detach one of them: SELECT provisioning.detach(%L);', v_new);
            CONTINUE;
        END IF;
        INSERT INTO provisioning.captures (relation, entity, key_column, key_attnum, created_at)
        VALUES (v_new, c.entity, c.key_column, c.key_attnum, c.created_at);
        UPDATE provisioning.capture_events SET relation = v_new WHERE relation = c.relation;
        DELETE FROM provisioning.captures WHERE relation = c.relation;
        UPDATE provisioning.events SET relation = v_new
         WHERE relation = c.relation
           AND id IN (SELECT event_id FROM provisioning.deliveries
                       WHERE stage = 'before' AND status IN ('waiting', 'pending', 'running'));
        FOR v_fn IN SELECT oid, proname FROM pg_proc WHERE pronamespace = 'provisioning'::regnamespace
                       AND (proname IN (SELECT provisioning.capture_function(c.relation, o) FROM unnest(v_ops) o)
                            OR proname LIKE provisioning.capture_function(c.relation, 'update') || '\_g%') LOOP
            FOR v_trg IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger
                          WHERE tgfoid = v_fn.oid AND tgparentid = 0 LOOP
                EXECUTE format('DROP TRIGGER %I ON %s', v_trg.tgname, v_trg.rel);
            END LOOP;
            EXECUTE format('DROP FUNCTION provisioning.%I()', v_fn.proname);
        END LOOP;
        FOREACH v_op IN ARRAY v_ops LOOP
            PERFORM provisioning.generate_capture(v_new, v_op);
        END LOOP;
        RAISE NOTICE 'provisioning: the capture of % follows it to its new name %', c.relation, v_new;
        v_moved := v_moved || v_table;
    END LOOP;
    RETURN v_moved;
END
$fn$;

-- Regenerate a captured table's capture when a trigger is created on it (a BEFORE UPDATE trigger
-- may change columns that column-specific capture triggers would not see: see
-- column_triggers_safe) or the table is altered (new columns join the "changed" comparison; a
-- renamed key, JSON or excluded column is followed; a change that breaks a condition is refused).
-- A renamed or moved table, or a renamed schema, is followed first (follow_table_renames).
-- Runs as the installer (a superuser): the role issuing the DDL needs no rights on this schema.
CREATE OR REPLACE FUNCTION provisioning.refresh_on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    c       record;
    v_table oid;
    v_rel   regclass;
    v_moved regclass[] := '{}';
BEGIN
    IF current_setting('provisioning.generating', true) = 'on' THEN
        RETURN;  -- generate_capture() creating its own triggers
    END IF;
    IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() WHERE command_tag IN ('ALTER TABLE', 'ALTER SCHEMA')) THEN
        v_moved := provisioning.follow_table_renames();  -- generated under their new names already
    END IF;
    FOR c IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        v_table := NULL;
        IF c.command_tag = 'CREATE TRIGGER' AND c.classid = 'pg_trigger'::regclass THEN
            SELECT t.tgrelid INTO v_table FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE t.oid = c.objid AND p.pronamespace <> 'provisioning'::regnamespace;
        ELSIF c.command_tag = 'ALTER TABLE' AND c.classid = 'pg_class'::regclass THEN
            v_table := c.objid;
        END IF;
        CONTINUE WHEN v_table IS NULL;
        -- the table itself, or the captured table it is a partition of
        FOR v_rel IN SELECT r FROM (SELECT v_table::regclass AS r UNION SELECT relid FROM pg_partition_ancestors(v_table)) x
                      WHERE EXISTS (SELECT 1 FROM provisioning.captures WHERE relation = provisioning.relation_name(x.r))
                        AND NOT x.r = ANY (v_moved) LOOP
            BEGIN
                IF c.command_tag = 'ALTER TABLE' THEN
                    PERFORM provisioning.follow_column_renames(v_rel);
                END IF;
                PERFORM provisioning.refresh(v_rel);
            EXCEPTION WHEN OTHERS THEN
                IF c.command_tag = 'CREATE TRIGGER' THEN
                    -- column-specific capture triggers must not stay next to a BEFORE trigger
                    RAISE EXCEPTION 'provisioning: cannot regenerate the capture of % for the new trigger: %', v_rel, SQLERRM
                        USING HINT = 'Fix the event declarations of the table (provisioning.capture_events), then create the trigger again.';
                END IF;
                -- A change the capture cannot follow (a column a condition reads renamed, dropped or
                -- retyped; the key or a JSON column dropped) is refused: allowed, it would leave
                -- triggers that fail every write of the application to the table.
                RAISE EXCEPTION 'provisioning: this ALTER TABLE would break the capture of %: %', v_rel, SQLERRM
                    USING HINT = 'Drop or redeclare the events that use what you are changing (provisioning.drop_event, '
                                 'provisioning.declare_event), attach the table with another key column (provisioning.attach) '
                                 'or detach it (provisioning.detach), then run the ALTER TABLE again.';
            END;
        END LOOP;
    END LOOP;
END
$fn$;
REVOKE ALL ON FUNCTION provisioning.refresh_on_ddl() FROM PUBLIC;

-- Event triggers need a superuser. Without one, update captures keep a single trigger that fires on
-- every UPDATE (column_triggers_safe() is false), ALTER TABLE needs a manual refresh(), and renamed
-- tables and columns are not followed.
DO $event_trigger$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RETURN;
    END IF;
    -- an earlier version's trigger did not fire on ALTER SCHEMA (renamed schemas are followed now)
    IF EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'provisioning_refresh_on_ddl'
                  AND NOT evttags @> ARRAY['ALTER SCHEMA']) THEN
        DROP EVENT TRIGGER provisioning_refresh_on_ddl;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'provisioning_refresh_on_ddl') THEN
        CREATE EVENT TRIGGER provisioning_refresh_on_ddl ON ddl_command_end
            WHEN TAG IN ('CREATE TRIGGER', 'ALTER TABLE', 'ALTER SCHEMA')
            EXECUTE FUNCTION provisioning.refresh_on_ddl();
    END IF;
END
$event_trigger$;

-- Column numbers of captures declared before they were stored (idempotent).
UPDATE provisioning.captures
   SET key_attnum = (provisioning.attnums(to_regclass(relation), ARRAY[key_column]))[1]
 WHERE key_attnum IS NULL AND to_regclass(relation) IS NOT NULL;
UPDATE provisioning.capture_events
   SET json_attnum = (provisioning.attnums(to_regclass(relation), ARRAY[json_column]))[1]
 WHERE json_attnum IS NULL AND json_column IS NOT NULL AND to_regclass(relation) IS NOT NULL;
UPDATE provisioning.capture_events
   SET exclude_attnums = provisioning.attnums(to_regclass(relation), exclude_columns)
 WHERE exclude_attnums IS NULL AND to_regclass(relation) IS NOT NULL;

-- Captured tables renamed while nothing followed them (before this version, or without the event
-- trigger): move them to their new names first, or the regeneration below would find no table
-- under the old name and drop their capture.
SELECT provisioning.follow_table_renames();

-- Routes and generated capture functions are derived data: rebuild them from the declarations, so
-- that running this file again (or a newer one) brings existing captures up to its code.
DO $regenerate$
DECLARE r record;
BEGIN
    FOR r IN SELECT DISTINCT relation, operation FROM provisioning.capture_events ORDER BY 1, 2 LOOP
        PERFORM provisioning.generate_capture(r.relation, r.operation);
    END LOOP;
    UPDATE provisioning.capture_events SET event = event WHERE false;  -- fires rebuild_routes
END
$regenerate$;

INSERT INTO provisioning.schema_version (version, description)
VALUES (1, 'capture, handlers, outbox, execution log')
ON CONFLICT (version) DO NOTHING;

COMMIT;
