-- VCS preset, part 2: provisioning.vcs_declare() declares the 15 JeraSoft Provisioning API events on
-- three tables. Requires sql/install.sql. Your tables or columns are named differently? Pass them:
--
--   SELECT provisioning.vcs_declare(
--       clients  => 'billing.customers',
--       accounts => 'billing.customer_accounts',
--       packages => 'billing.subscriptions',
--       columns  => '{"clients.status": "state", "clients.balance": "saldo",
--                     "clients.custom_fields": "extra", "packages.paid_until": "valid_to"}');
--
-- Column keys (default in brackets):
--   clients.key [id]  clients.status [status]  clients.balance [balance]
--   clients.custom_fields [custom_fields]  clients.archived_value [archived]
--   clients.exclude [["created_at","updated_at"]]  - further columns that never fire clients.update
--   accounts.key [id]  accounts.exclude [["created_at","updated_at"]]
--   packages.key [id]  packages.status [status]  packages.paid_until [paid_until]
--   packages.active_value [active]  packages.inactive_value [inactive]  packages.closed_value [closed]
--   packages.exclude [["created_at","updated_at"]]
-- Excluded columns that do not exist in your table are ignored. Running it again redeclares.
--
-- Order of events emitted by one row change (trigger positions): create 10, update 20,
-- custom_fields.update 30, balance_zero 40, balance_notzero 50, archive 60, delete 70;
-- subscriptions: assign 10, activate 20, deactivate 30, renew 40, close 50.

-- The defaults are resolved when called ('x'::text::regclass), not when this file is loaded: a
-- plain 'clients' default would be looked up now and fail where no table of that name exists.
CREATE OR REPLACE FUNCTION provisioning.vcs_declare(
    clients regclass DEFAULT 'clients'::text::regclass, accounts regclass DEFAULT 'accounts'::text::regclass,
    packages regclass DEFAULT 'client_packages'::text::regclass, columns jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    c_key  text := coalesce(columns ->> 'clients.key', 'id');
    c_st   text := coalesce(columns ->> 'clients.status', 'status');
    c_bal  text := coalesce(columns ->> 'clients.balance', 'balance');
    c_cf   text := coalesce(columns ->> 'clients.custom_fields', 'custom_fields');
    c_arch text := coalesce(columns ->> 'clients.archived_value', 'archived');
    a_key  text := coalesce(columns ->> 'accounts.key', 'id');
    p_key  text := coalesce(columns ->> 'packages.key', 'id');
    p_st   text := coalesce(columns ->> 'packages.status', 'status');
    p_paid text := coalesce(columns ->> 'packages.paid_until', 'paid_until');
    p_act  text := coalesce(columns ->> 'packages.active_value', 'active');
    p_inact text := coalesce(columns ->> 'packages.inactive_value', 'inactive');
    p_clos text := coalesce(columns ->> 'packages.closed_value', 'closed');
    c_excl text[];
    a_excl text[];
    p_excl text[];
    archived text;
BEGIN
    -- keep only excluded columns that exist, so one mapping fits tables with or without timestamps
    SELECT coalesce(array_agg(x), '{}') INTO c_excl FROM (
        SELECT jsonb_array_elements_text(coalesce(columns -> 'clients.exclude', '["created_at","updated_at"]')) AS x) s
     WHERE EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = clients AND attname = s.x AND attnum > 0 AND NOT attisdropped);
    c_excl := c_excl || ARRAY[c_bal, c_cf];
    SELECT coalesce(array_agg(x), '{}') INTO a_excl FROM (
        SELECT jsonb_array_elements_text(coalesce(columns -> 'accounts.exclude', '["created_at","updated_at"]')) AS x) s
     WHERE EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = accounts AND attname = s.x AND attnum > 0 AND NOT attisdropped);
    SELECT coalesce(array_agg(x), '{}') INTO p_excl FROM (
        SELECT jsonb_array_elements_text(coalesce(columns -> 'packages.exclude', '["created_at","updated_at"]')) AS x) s
     WHERE EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = packages AND attname = s.x AND attnum > 0 AND NOT attisdropped);

    archived := format('new.%1$I IS NOT DISTINCT FROM %2$L AND old.%1$I IS DISTINCT FROM %2$L', c_st, c_arch);

    PERFORM provisioning.attach(clients, 'clients', c_key);
    PERFORM provisioning.declare_event('clients.create', clients, 'insert', NULL, 'row', p_position => 10);
    -- an archive is reported as archive only, even if details changed in the same update
    PERFORM provisioning.declare_event('clients.update', clients, 'update', format('NOT (%s)', archived),
                                       'changed', c_excl, p_position => 20);
    PERFORM provisioning.declare_event('clients.custom_fields.update', clients, 'update',
                                       format('old.%1$I::jsonb IS DISTINCT FROM new.%1$I::jsonb', c_cf),
                                       'json_keys', p_json_column => c_cf, p_position => 30);
    PERFORM provisioning.declare_event('clients.balance_zero', clients, 'update',
                                       format('old.%1$I > 0 AND new.%1$I <= 0', c_bal), 'empty', p_position => 40);
    PERFORM provisioning.declare_event('clients.balance_notzero', clients, 'update',
                                       format('old.%1$I < 0 AND new.%1$I >= 0', c_bal), 'empty', p_position => 50);
    PERFORM provisioning.declare_event('clients.archive', clients, 'update', archived, 'empty', p_position => 60);
    PERFORM provisioning.declare_event('clients.delete', clients, 'delete', NULL, 'empty', p_position => 70);

    PERFORM provisioning.attach(accounts, 'accounts', a_key);
    PERFORM provisioning.declare_event('clients.accounts.create', accounts, 'insert', NULL, 'row', p_position => 10);
    PERFORM provisioning.declare_event('clients.accounts.update', accounts, 'update', NULL, 'changed', a_excl, p_position => 20);
    PERFORM provisioning.declare_event('clients.accounts.delete', accounts, 'delete', NULL, 'empty', p_position => 30);

    PERFORM provisioning.attach(packages, 'client_packages', p_key);
    PERFORM provisioning.declare_event('clients.subscriptions.assign', packages, 'insert', NULL, 'row', p_position => 10);
    PERFORM provisioning.declare_event('clients.subscriptions.activate', packages, 'update',
        format('new.%1$I IS NOT DISTINCT FROM %2$L AND old.%1$I IS DISTINCT FROM %2$L', p_st, p_act), 'changed', p_excl, p_position => 20);
    PERFORM provisioning.declare_event('clients.subscriptions.deactivate', packages, 'update',
        format('new.%1$I IS NOT DISTINCT FROM %2$L AND old.%1$I IS DISTINCT FROM %2$L', p_st, p_inact), 'changed', p_excl, p_position => 30);
    PERFORM provisioning.declare_event('clients.subscriptions.renew', packages, 'update',
        -- extended: moved later, or set where there was none
        format('old.%1$I IS NOT DISTINCT FROM %2$L AND new.%1$I IS NOT DISTINCT FROM %2$L AND (new.%3$I > old.%3$I OR (old.%3$I IS NULL AND new.%3$I IS NOT NULL))', p_st, p_act, p_paid),
        'changed', p_excl, p_position => 40);
    PERFORM provisioning.declare_event('clients.subscriptions.close', packages, 'update',
        format('new.%1$I IS NOT DISTINCT FROM %2$L AND old.%1$I IS DISTINCT FROM %2$L', p_st, p_clos), 'empty', p_position => 50);
    PERFORM provisioning.declare_event('clients.subscriptions.close', packages, 'delete', NULL, 'empty', p_position => 50);
END
$fn$;
