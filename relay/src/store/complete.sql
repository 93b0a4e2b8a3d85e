-- Batched completion, fenced by the claim token: a relay whose lease expired (and whose rows
-- another relay re-claimed with a new token) changes nothing. Returns the ids it did complete.
-- action: done (delete: the attempt log keeps the record) | retry | dead | release (undo the claim)
-- $1..$5: the outcomes. $6..$20: the execution log, one row per attempt, whatever happened to the
-- lease (before-stage outcomes are logged here too); $21 this relay's name. One statement, so that
-- the common case is one round trip.
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::text[])
        AS t(id, token, action, delay_ms, error)
), done AS (
    DELETE FROM provisioning.deliveries d
     USING input i
     -- One primary-key probe per input row, never a scan of the whole queue (the relay's sessions
     -- run with enable_seqscan = off). "IS TRUE" keeps the planner from walking the partial index
     -- of running deliveries (WHERE status = 'running') once per input row instead. (An extra
     -- "d.id = ANY ($1)" made generic plans sort the whole array once per row: 69 ms per 500.)
     WHERE d.id = i.id AND d.lease_token = i.token AND (d.status = 'running') IS TRUE AND i.action = 'done'
 RETURNING d.id
), other AS (
    UPDATE provisioning.deliveries d
       SET status = CASE i.action WHEN 'dead' THEN 'dead' ELSE 'pending' END,
           attempts = CASE i.action WHEN 'release' THEN greatest(d.attempts - 1, 0) ELSE d.attempts END,
           -- a retry waits its delay; without one (a release, a 410's pause) the delivery keeps
           -- its place in the claim order (deliveries_due: earliest due first)
           next_attempt_at = CASE WHEN i.delay_ms > 0 THEN now() + i.delay_ms * interval '1 millisecond'
                                  ELSE d.next_attempt_at END,
           last_error = coalesce(i.error, d.last_error),
           lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
           updated_at = now()
      FROM input i
     WHERE d.id = i.id AND d.lease_token = i.token AND (d.status = 'running') IS TRUE AND i.action <> 'done'
 RETURNING d.id
),
logged AS (
    INSERT INTO provisioning.attempts
        (delivery_id, event_id, handler_id, handler_name, event_name, object_id, attempt, started_at,
         duration_ms, outcome, http_status, exit_code, request_body, response, error, relay)
    SELECT t.delivery_id, t.event_id, t.handler_id, t.handler_name, t.event_name, t.object_id, t.attempt,
           t.started_at, t.duration_ms, t.outcome, t.http_status, t.exit_code, t.request_body, t.response,
           t.error, $21
      FROM unnest($6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::int[],
                  $13::timestamptz[], $14::float8[], $15::text[], $16::int[], $17::int[], $18::text[],
                  $19::text[], $20::text[])
        AS t(delivery_id, event_id, handler_id, handler_name, event_name, object_id, attempt, started_at,
             duration_ms, outcome, http_status, exit_code, request_body, response, error)
)
SELECT id FROM done UNION ALL SELECT id FROM other
