-- Batched completion, fenced by the claim token: a relay whose lease expired (and whose rows
-- another relay re-claimed with a new token) changes nothing. Returns the ids it did complete.
-- action: done (delete: the attempt log keeps the record) | retry | dead | release (undo the claim)
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::text[])
        AS t(id, token, action, delay_ms, error)
), done AS (
    DELETE FROM provisioning.deliveries d
     USING input i
     -- primary-key lookups, never a scan of the whole queue; "IS TRUE" keeps the planner from
     -- walking the partial index of running deliveries (WHERE status = 'running') per input row
     WHERE d.id = ANY ($1::bigint[])
       AND d.id = i.id AND d.lease_token = i.token AND (d.status = 'running') IS TRUE AND i.action = 'done'
 RETURNING d.id
), other AS (
    UPDATE provisioning.deliveries d
       SET status = CASE i.action WHEN 'dead' THEN 'dead' ELSE 'pending' END,
           attempts = CASE i.action WHEN 'release' THEN greatest(d.attempts - 1, 0) ELSE d.attempts END,
           next_attempt_at = now() + i.delay_ms * interval '1 millisecond',
           last_error = coalesce(i.error, d.last_error),
           lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
           updated_at = now()
      FROM input i
     WHERE d.id = ANY ($1::bigint[])
       AND d.id = i.id AND d.lease_token = i.token AND (d.status = 'running') IS TRUE AND i.action <> 'done'
 RETURNING d.id
)
SELECT id FROM done UNION ALL SELECT id FROM other
