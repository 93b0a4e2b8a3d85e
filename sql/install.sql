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

-- One row per event. The trigger for it is generated from this row by provisioning.declare_event().
CREATE TABLE IF NOT EXISTS provisioning.capture_events (
    event           text NOT NULL,
    relation        text NOT NULL REFERENCES provisioning.captures (relation) ON DELETE CASCADE,
    operation       text NOT NULL,
    condition       text,                    -- SQL boolean over old.* / new.*; NULL = always
    data_shape      text NOT NULL,           -- row | changed | json_keys | empty
    json_column     text,                    -- for data_shape = json_keys
    exclude_columns text[] NOT NULL DEFAULT '{}',  -- for data_shape = changed: not "changes"
    position        int NOT NULL,            -- order of events emitted by one row change
    trigger_name    text NOT NULL,
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
    IF NEW.secret IS NOT NULL AND length(NEW.secret) < 8 THEN
        RAISE EXCEPTION 'invalid handler "%": field "secret": too short (at least 8 characters; whsec_<base64> recommended)', NEW.name
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
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT deliveries_status CHECK (status IN ('waiting', 'pending', 'running', 'dead', 'skipped'))
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.02,
        autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0.02);

-- Claim: per handler, oldest first, only claimable rows (index = size of the backlog).
CREATE INDEX IF NOT EXISTS deliveries_claim ON provisioning.deliveries (handler_id, id) WHERE status = 'pending';
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

------------------------------------------------------------------------------------------------------
-- Capture: the generic trigger function. Everything row-specific comes in as trigger arguments
-- fixed at declaration time; the event's condition is the trigger's WHEN clause, evaluated by the
-- executor without entering PL/pgSQL. No dynamic SQL runs per row.
--
-- TG_ARGV: 0 event, 1 entity, 2 key column, 3 data shape, 4 json column ('' if none),
--          5 excluded columns as a text[] literal
------------------------------------------------------------------------------------------------------

-- SECURITY DEFINER: application roles that change captured tables need no privileges on the
-- provisioning schema; the fixed search_path keeps a caller's search_path from hijacking it.
CREATE OR REPLACE FUNCTION provisioning.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_event  text := TG_ARGV[0];
    v_shape  text := TG_ARGV[3];
    v_old    jsonb;
    v_new    jsonb;
    v_row    jsonb;
    v_key    jsonb;
    v_data   jsonb;
    v_excl   text[];
    v_jcol   text;
    v_id     bigint;
    v_op     text := lower(TG_OP);
    v_has_before boolean;
BEGIN
    IF TG_OP <> 'INSERT' THEN v_old := to_jsonb(OLD); END IF;
    IF TG_OP <> 'DELETE' THEN v_new := to_jsonb(NEW); END IF;
    v_row := coalesce(v_new, v_old);
    v_key := v_row -> TG_ARGV[2];

    IF v_shape = 'row' THEN
        v_data := v_row;
    ELSIF v_shape = 'empty' OR TG_OP <> 'UPDATE' THEN
        v_data := '{}'::jsonb;
    ELSIF v_shape = 'changed' THEN
        v_excl := TG_ARGV[5]::text[];
        SELECT jsonb_build_object(TG_ARGV[2], v_key) || coalesce(jsonb_object_agg(n.key, n.value), '{}'::jsonb)
          INTO v_data
          FROM jsonb_each(v_new) n
         WHERE n.value IS DISTINCT FROM v_old -> n.key
           AND NOT (n.key = ANY (v_excl));
    ELSE -- json_keys: key + {json_column: {changed key: new value or null when removed}}
        v_jcol := TG_ARGV[4];
        SELECT jsonb_build_object(TG_ARGV[2], v_key, v_jcol, coalesce(jsonb_object_agg(k.key, v_new -> v_jcol -> k.key), '{}'::jsonb))
          INTO v_data
          FROM (SELECT jsonb_object_keys(CASE WHEN jsonb_typeof(v_new -> v_jcol) = 'object' THEN v_new -> v_jcol ELSE '{}' END) AS key
                UNION
                SELECT jsonb_object_keys(CASE WHEN jsonb_typeof(v_old -> v_jcol) = 'object' THEN v_old -> v_jcol ELSE '{}' END)) k
         WHERE (v_new -> v_jcol -> k.key) IS DISTINCT FROM (v_old -> v_jcol -> k.key);
    END IF;

    INSERT INTO provisioning.events (name, entity, object_id, operation, data, old_row, new_row, relation)
    VALUES (v_event, TG_ARGV[1], coalesce(v_key, 'null'::jsonb), v_op, v_data, v_old, v_new,
            quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME))
    RETURNING id INTO v_id;

    -- Fan out to subscribed handlers. Paused handlers hold their deliveries; disabled and archived
    -- handlers get none. If a before-stage handler subscribes, only the first before-stage delivery
    -- is claimable; the rest of the chain and every after-stage delivery wait for its decision.
    SELECT bool_or(h.stage = 'before') INTO v_has_before
      FROM provisioning.handlers h
     WHERE h.status IN ('enabled', 'paused')
       AND EXISTS (SELECT 1 FROM unnest(h.events) p WHERE provisioning.event_matches(p, v_event));

    IF v_has_before IS NOT NULL THEN
        INSERT INTO provisioning.deliveries (event_id, handler_id, stage, priority, entity, object_key, status)
        SELECT v_id, h.id, h.stage, h.priority, TG_ARGV[1], coalesce(v_key #>> '{}', ''),
               CASE WHEN NOT v_has_before THEN 'pending'
                    WHEN h.stage = 'before' AND row_number() OVER (PARTITION BY h.stage ORDER BY h.priority, h.id) = 1 THEN 'pending'
                    ELSE 'waiting' END
          FROM provisioning.handlers h
         WHERE h.status IN ('enabled', 'paused')
           AND EXISTS (SELECT 1 FROM unnest(h.events) p WHERE provisioning.event_matches(p, v_event))
         ORDER BY h.priority, h.id;

        -- Ring the doorbell only if a relay sleeps (one folded NOTIFY per transaction at most).
        -- (a relay killed while asleep stops counting once its heartbeat is a minute old)
        IF EXISTS (SELECT 1 FROM provisioning.relays WHERE sleeping AND heartbeat_at > now() - interval '1 minute') THEN
            PERFORM pg_notify('provisioning_events', '');
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;

-- How captures, capture_events and events name a table: schema-qualified and quoted, whatever the
-- search_path (regclass::text would drop the schema when it is on the search_path).
CREATE OR REPLACE FUNCTION provisioning.relation_name(p_table regclass) RETURNS text
LANGUAGE sql STABLE AS $fn$
    SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table
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
    INSERT INTO provisioning.captures (relation, entity, key_column)
    VALUES (provisioning.relation_name(p_table), p_entity, p_key_column)
    ON CONFLICT (relation) DO UPDATE SET entity = EXCLUDED.entity, key_column = EXCLUDED.key_column;
    -- re-attached with another entity or key: the declared events' triggers carry both as arguments
    IF v_prev.relation IS NOT NULL AND (v_prev.entity, v_prev.key_column) IS DISTINCT FROM (p_entity, p_key_column) THEN
        PERFORM provisioning.refresh(p_table);
    END IF;
END
$fn$;

-- Declare (or redeclare) one event on an attached table. Generates its trigger; a broken condition,
-- an unknown table or column fails here, naming the event.
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
    v_when   text;
    v_changed text;
    v_trig   text;
    v_pos    int;
    v_col    text;
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
        IF p_json_column IS NULL OR NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = p_json_column AND attnum > 0 AND NOT attisdropped AND atttypid IN ('json'::regtype, 'jsonb'::regtype)) THEN
            RAISE EXCEPTION 'event %: json column % is not a json/jsonb column of %', p_event, coalesce(quote_ident(p_json_column), 'NULL'), p_table;
        END IF;
    END IF;
    FOREACH v_col IN ARRAY coalesce(p_exclude, '{}') LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = v_col AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'event %: excluded column % does not exist in %', p_event, quote_ident(v_col), p_table;
        END IF;
    END LOOP;

    -- "changed" events fire only when a non-excluded column changed: a row comparison, generated now.
    IF p_data = 'changed' THEN
        -- json has no equality operator: compare it as jsonb (as the reported data does)
        SELECT string_agg(format(CASE WHEN atttypid = 'json'::regtype THEN 'old.%1$I::jsonb' ELSE 'old.%1$I' END, attname), ', ' ORDER BY attnum),
               string_agg(format(CASE WHEN atttypid = 'json'::regtype THEN 'new.%1$I::jsonb' ELSE 'new.%1$I' END, attname), ', ' ORDER BY attnum)
          INTO v_changed, v_col
          FROM pg_attribute
         WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
           AND NOT (attname = ANY (coalesce(p_exclude, '{}')));
        IF v_changed IS NULL THEN
            RAISE EXCEPTION 'event %: every column of % is excluded; nothing could change', p_event, p_table;
        END IF;
        v_changed := format('ROW(%s) IS DISTINCT FROM ROW(%s)', v_changed, v_col);
    END IF;

    v_when := 'coalesce(current_setting(''provisioning.suppress'', true), '''') <> ''on''';
    IF p_condition IS NOT NULL AND btrim(p_condition) <> '' THEN
        v_when := v_when || ' AND (' || p_condition || ')';
    END IF;
    IF v_changed IS NOT NULL THEN
        v_when := v_when || ' AND ' || v_changed;
    END IF;

    SELECT * INTO v_old FROM provisioning.capture_events WHERE event = p_event AND operation = p_operation;
    IF FOUND THEN
        IF to_regclass(v_old.relation) IS NOT NULL THEN
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', v_old.trigger_name, v_old.relation);
        END IF;
        DELETE FROM provisioning.capture_events WHERE event = p_event AND operation = p_operation;
    END IF;
    IF EXISTS (SELECT 1 FROM provisioning.capture_events WHERE event = p_event AND relation <> c.relation) THEN
        RAISE EXCEPTION 'event %: already declared on another table (%)', p_event,
            (SELECT relation FROM provisioning.capture_events WHERE event = p_event LIMIT 1);
    END IF;
    v_pos := coalesce(p_position, v_old.position,
                      (SELECT coalesce(max(position), 0) + 10 FROM provisioning.capture_events WHERE relation = c.relation));
    -- Triggers of one table fire in name order: the zero-padded position makes that the documented order.
    v_trig := format('prov_%s_%s_%s', lpad(v_pos::text, 4, '0'), p_event, p_operation);
    IF length(v_trig) > 63 THEN
        v_trig := left(v_trig, 54) || '_' || left(md5(p_event || ' ' || p_operation), 8);
    END IF;

    BEGIN
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW WHEN (%s) EXECUTE FUNCTION provisioning.capture(%L, %L, %L, %L, %L, %L)',
                       v_trig, upper(p_operation), p_table, v_when,
                       p_event, c.entity, c.key_column, p_data, coalesce(p_json_column, ''), coalesce(p_exclude, '{}')::text);
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'event %: cannot create its trigger on %: %', p_event, p_table, SQLERRM
            USING HINT = 'Check the condition: it must be a boolean SQL expression over old.<column> and new.<column> (old is not available for insert, new not for delete).';
    END;

    INSERT INTO provisioning.capture_events (event, relation, operation, condition, data_shape, json_column, exclude_columns, position, trigger_name)
    VALUES (p_event, c.relation, p_operation, nullif(btrim(p_condition), ''), p_data, p_json_column, coalesce(p_exclude, '{}'), v_pos, v_trig);
END
$fn$;

-- Remove one event (its trigger goes too).
CREATE OR REPLACE FUNCTION provisioning.drop_event(p_event text) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE e provisioning.capture_events;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM provisioning.capture_events WHERE event = p_event) THEN
        RAISE EXCEPTION 'event %: not declared', p_event;
    END IF;
    FOR e IN SELECT * FROM provisioning.capture_events WHERE event = p_event LOOP
        IF to_regclass(e.relation) IS NOT NULL THEN
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', e.trigger_name, e.relation);
        END IF;
    END LOOP;
    DELETE FROM provisioning.capture_events WHERE event = p_event;
END
$fn$;

-- Detach capture from a table: drops all its event triggers. User data is untouched.
CREATE OR REPLACE FUNCTION provisioning.detach(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE e record;
BEGIN
    FOR e IN SELECT DISTINCT event FROM provisioning.capture_events WHERE relation = provisioning.relation_name(p_table) LOOP
        PERFORM provisioning.drop_event(e.event);
    END LOOP;
    DELETE FROM provisioning.captures WHERE relation = provisioning.relation_name(p_table);
END
$fn$;

-- Regenerate the triggers of a table's "changed" events after its columns changed (ALTER TABLE ADD
-- COLUMN): the change comparison lists the columns explicitly, so new columns need this call.
CREATE OR REPLACE FUNCTION provisioning.refresh(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE e provisioning.capture_events;
BEGIN
    FOR e IN SELECT * FROM provisioning.capture_events WHERE relation = provisioning.relation_name(p_table) ORDER BY position LOOP
        PERFORM provisioning.declare_event(e.event, p_table, e.operation, e.condition, e.data_shape,
                                           e.exclude_columns, e.json_column, e.position);
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

INSERT INTO provisioning.schema_version (version, description)
VALUES (1, 'capture, handlers, outbox, execution log')
ON CONFLICT (version) DO NOTHING;

COMMIT;
