-- VCS preset: reference tables + the 15 JeraSoft events on them. Run after sql/install.sql:
--
--   psql -v ON_ERROR_STOP=1 -f sql/install.sql -f sql/vcs/install.sql
--
-- Already have your own clients/accounts/packages tables? Run only sql/vcs/events.sql and call
-- provisioning.vcs_declare(...) with your table and column names (see that file).
BEGIN;
SET LOCAL client_min_messages = warning;
-- the same lock as sql/install.sql: concurrent preset installs run one after the other
SELECT pg_advisory_xact_lock(7291850211);
\ir tables.sql
\ir events.sql
SELECT provisioning.vcs_declare();
COMMIT;
