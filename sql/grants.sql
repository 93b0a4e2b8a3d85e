-- Least-privilege role for the relay. Run as the owner of the provisioning schema (the DBA who ran
-- install.sql), after install.sql:
--
--   psql -v ON_ERROR_STOP=1 -v relay_role=provisioning_relay -f sql/grants.sql
--   CREATE ROLE relay_login LOGIN PASSWORD '...' IN ROLE provisioning_relay;   -- the relay's login
--
-- What the relay needs and nothing more:
--   - read handlers and capture declarations; pause a handler on 410 Gone; manage handlers through
--     its CLI/API (drop INSERT/DELETE on handlers if you manage them only with SQL);
--   - claim, complete, retry and prune deliveries; write the execution log; heartbeat;
--   - read events, record before-stage decisions on them, prune old ones;
--   - run the decision functions.
-- Application roles need no grants at all: capture runs as the schema owner (SECURITY DEFINER).
-- Before-stage handlers write back to YOUR tables (modify / undo): only if you use them, also grant
--   GRANT SELECT, INSERT, UPDATE, DELETE ON clients, accounts, client_packages TO provisioning_relay;
-- The relay never needs CREATE, TRUNCATE, superuser, or access to other schemas.

\if :{?relay_role}
\else
\set relay_role provisioning_relay
\endif

SELECT format('CREATE ROLE %I NOLOGIN', :'relay_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'relay_role') \gexec

GRANT USAGE ON SCHEMA provisioning TO :"relay_role";
GRANT SELECT ON provisioning.schema_version, provisioning.captures, provisioning.capture_events TO :"relay_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON provisioning.handlers TO :"relay_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON provisioning.deliveries TO :"relay_role";
GRANT SELECT, INSERT, DELETE ON provisioning.attempts TO :"relay_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON provisioning.relays TO :"relay_role";
GRANT SELECT, DELETE ON provisioning.events TO :"relay_role";
GRANT UPDATE (decision, decision_reason) ON provisioning.events TO :"relay_role";
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA provisioning TO :"relay_role";
