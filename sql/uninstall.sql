-- Provisioning Relay: remove everything the product installed.
--
--   psql -v ON_ERROR_STOP=1 -f sql/uninstall.sql
--
-- Drops the capture triggers it generated on your tables, then the schema `provisioning` with the
-- outbox, handlers and execution log. Your tables and rows are never touched. Safe to run twice.
-- The VCS preset's reference tables (sql/vcs/) hold user data and are NOT dropped here; drop them
-- yourself if you created them only to try the product.

BEGIN;
SET LOCAL client_min_messages = warning;
DO $lock$ BEGIN PERFORM pg_advisory_xact_lock(7291850211); END $lock$;

DO $uninstall$
DECLARE e record;
BEGIN
    IF to_regclass('provisioning.capture_events') IS NOT NULL THEN
        FOR e IN SELECT DISTINCT relation, trigger_name FROM provisioning.capture_events LOOP
            IF to_regclass(e.relation) IS NOT NULL THEN
                EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', e.trigger_name, e.relation);
            END IF;
        END LOOP;
    END IF;
    -- Belt and braces: any trigger on a user table that still calls a function of the schema.
    FOR e IN SELECT t.tgname, t.tgrelid::regclass AS rel
               FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
               JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'provisioning' AND NOT t.tgisinternal
                AND t.tgrelid NOT IN (SELECT c.oid FROM pg_class c JOIN pg_namespace cn ON cn.oid = c.relnamespace WHERE cn.nspname = 'provisioning') LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', e.tgname, e.rel);
    END LOOP;
END
$uninstall$;

DROP EVENT TRIGGER IF EXISTS provisioning_refresh_on_ddl;
DROP SCHEMA IF EXISTS provisioning CASCADE;
COMMIT;
