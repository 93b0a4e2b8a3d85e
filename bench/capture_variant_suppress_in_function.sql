-- Experiment for bench/capture.sh (VARIANT=suppress_in_function), not part of the product.
--
-- PostgreSQL compiles every trigger's WHEN clause afresh for each statement (stringToNode +
-- ExecPrepareQual per query), so each clause costs every UPDATE of a watched table a few
-- microseconds even when no event fires. The relay's suppress flag adds
--   coalesce(current_setting('provisioning.suppress', true), '') <> 'on'
-- to every WHEN clause. This variant removes it from the WHEN clauses and checks it once at the
-- top of provisioning.capture() instead (i.e. only when an event would actually be emitted).
DO $variant$
DECLARE
    t    record;
    def  text;
    body text;
BEGIN
    FOR t IN SELECT oid, tgname, tgrelid::regclass AS rel FROM pg_trigger WHERE tgname LIKE 'prov\_%' AND NOT tgisinternal LOOP
        def := pg_get_triggerdef(t.oid);
        def := replace(def, $s$(COALESCE(current_setting('provisioning.suppress'::text, true), ''::text) <> 'on'::text) AND $s$, '');
        def := replace(def, $s$WHEN ((COALESCE(current_setting('provisioning.suppress'::text, true), ''::text) <> 'on'::text)) $s$, '');
        IF def LIKE '%provisioning.suppress%' THEN
            RAISE EXCEPTION 'variant: unexpected trigger definition %', def;
        END IF;
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
        EXECUTE def;
    END LOOP;
    body := pg_get_functiondef('provisioning.capture()'::regprocedure);
    IF strpos(body, E'\nBEGIN\n') = 0 THEN
        RAISE EXCEPTION 'variant: unexpected body of provisioning.capture()';
    END IF;
    body := regexp_replace(body, E'\nBEGIN\n',
        E'\nBEGIN\n    IF current_setting(''provisioning.suppress'', true) = ''on'' THEN RETURN NULL; END IF;\n');
    EXECUTE body;
END
$variant$;
