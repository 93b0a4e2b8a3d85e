-- Experiment for bench/capture.sh (VARIANT=dispatch), not part of the product: a prototype of the
-- cheaper trigger layout suggested by the benchmark.
--
-- Today every declared event is its own AFTER ROW trigger whose WHEN clause holds the condition.
-- PostgreSQL re-reads and compiles each WHEN clause for every statement (stringToNode +
-- ExecPrepareQual per query execution), so five update events cost each single-row UPDATE tens of
-- microseconds even when nothing fires. This variant replaces them with ONE trigger per table and
-- operation, without WHEN, whose PL/pgSQL function is generated from provisioning.capture_events:
-- static IF blocks in position order (PL/pgSQL caches their compiled expressions per session), the
-- suppress flag checked once, and a shared emit function for the events that fire. Still no
-- dynamic SQL per row.
--
-- provisioning.bench_emit() is provisioning.capture() with its trigger arguments as parameters.

CREATE OR REPLACE FUNCTION provisioning.bench_emit(
    p_event text, p_entity text, p_key_column text, p_shape text, p_json_column text, p_exclude text[],
    p_op text, v_old jsonb, v_new jsonb, p_relation text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_row    jsonb := coalesce(v_new, v_old);
    v_key    jsonb;
    v_data   jsonb;
    v_id     bigint;
    v_has_before boolean;
BEGIN
    v_key := v_row -> p_key_column;
    IF p_shape = 'row' THEN
        v_data := v_row;
    ELSIF p_shape = 'empty' OR p_op <> 'update' THEN
        v_data := '{}'::jsonb;
    ELSIF p_shape = 'changed' THEN
        SELECT jsonb_build_object(p_key_column, v_key) || coalesce(jsonb_object_agg(n.key, n.value), '{}'::jsonb)
          INTO v_data
          FROM jsonb_each(v_new) n
         WHERE n.value IS DISTINCT FROM v_old -> n.key
           AND NOT (n.key = ANY (p_exclude));
    ELSE
        SELECT jsonb_build_object(p_key_column, v_key, p_json_column,
                                  coalesce(jsonb_object_agg(k.key, v_new -> p_json_column -> k.key), '{}'::jsonb))
          INTO v_data
          FROM (SELECT jsonb_object_keys(CASE WHEN jsonb_typeof(v_new -> p_json_column) = 'object' THEN v_new -> p_json_column ELSE '{}' END) AS key
                UNION
                SELECT jsonb_object_keys(CASE WHEN jsonb_typeof(v_old -> p_json_column) = 'object' THEN v_old -> p_json_column ELSE '{}' END)) k
         WHERE (v_new -> p_json_column -> k.key) IS DISTINCT FROM (v_old -> p_json_column -> k.key);
    END IF;

    INSERT INTO provisioning.events (name, entity, object_id, operation, data, old_row, new_row, relation)
    VALUES (p_event, p_entity, coalesce(v_key, 'null'::jsonb), p_op, v_data, v_old, v_new, p_relation)
    RETURNING id INTO v_id;

    SELECT bool_or(h.stage = 'before') INTO v_has_before
      FROM provisioning.handlers h
     WHERE h.status IN ('enabled', 'paused')
       AND EXISTS (SELECT 1 FROM unnest(h.events) p WHERE provisioning.event_matches(p, p_event));
    IF v_has_before IS NOT NULL THEN
        INSERT INTO provisioning.deliveries (event_id, handler_id, stage, priority, entity, object_key, status)
        SELECT v_id, h.id, h.stage, h.priority, p_entity, coalesce(v_key #>> '{}', ''),
               CASE WHEN NOT v_has_before THEN 'pending'
                    WHEN h.stage = 'before' AND row_number() OVER (PARTITION BY h.stage ORDER BY h.priority, h.id) = 1 THEN 'pending'
                    ELSE 'waiting' END
          FROM provisioning.handlers h
         WHERE h.status IN ('enabled', 'paused')
           AND EXISTS (SELECT 1 FROM unnest(h.events) p WHERE provisioning.event_matches(p, p_event))
         ORDER BY h.priority, h.id;
        IF EXISTS (SELECT 1 FROM provisioning.relays WHERE sleeping AND heartbeat_at > now() - interval '1 minute') THEN
            PERFORM pg_notify('provisioning_events', '');
        END IF;
    END IF;
END
$fn$;

DO $variant$
DECLARE
    r       record;
    e       record;
    body    text;
    cond    text;
    changed text;
    n       int := 0;
BEGIN
    FOR r IN SELECT DISTINCT relation, operation FROM provisioning.capture_events ORDER BY 1, 2 LOOP
        n := n + 1;
        body := E'BEGIN\n    IF current_setting(''provisioning.suppress'', true) = ''on'' THEN RETURN NULL; END IF;\n';
        FOR e IN SELECT ce.*, c.entity, c.key_column
                   FROM provisioning.capture_events ce JOIN provisioning.captures c USING (relation)
                  WHERE ce.relation = r.relation AND ce.operation = r.operation
                  ORDER BY ce.position, ce.event LOOP
            cond := coalesce('(' || e.condition || ')', 'true');
            IF e.data_shape = 'changed' THEN
                SELECT format('ROW(%s) IS DISTINCT FROM ROW(%s)',
                              string_agg(format(CASE WHEN atttypid = 'json'::regtype THEN 'OLD.%1$I::jsonb' ELSE 'OLD.%1$I' END, attname), ', ' ORDER BY attnum),
                              string_agg(format(CASE WHEN atttypid = 'json'::regtype THEN 'NEW.%1$I::jsonb' ELSE 'NEW.%1$I' END, attname), ', ' ORDER BY attnum))
                  INTO changed
                  FROM pg_attribute
                 WHERE attrelid = r.relation::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
                   AND NOT (attname = ANY (e.exclude_columns));
                cond := cond || ' AND ' || changed;
            END IF;
            body := body || format(E'    IF %s THEN\n        PERFORM provisioning.bench_emit(%L, %L, %L, %L, %L, %L, %L, %s, %s, %L);\n    END IF;\n',
                                   cond, e.event, e.entity, e.key_column, e.data_shape, coalesce(e.json_column, ''),
                                   e.exclude_columns, e.operation,
                                   CASE WHEN r.operation = 'insert' THEN 'NULL' ELSE 'to_jsonb(OLD)' END,
                                   CASE WHEN r.operation = 'delete' THEN 'NULL' ELSE 'to_jsonb(NEW)' END, r.relation);
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', e.trigger_name, r.relation);
        END LOOP;
        body := body || E'    RETURN NULL;\nEND';
        EXECUTE format('CREATE OR REPLACE FUNCTION provisioning.bench_dispatch_%s() RETURNS trigger LANGUAGE plpgsql AS %L', n, body);
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION provisioning.bench_dispatch_%s()',
                       'prov_dispatch_' || r.operation, upper(r.operation), r.relation, n);
    END LOOP;
END
$variant$;
