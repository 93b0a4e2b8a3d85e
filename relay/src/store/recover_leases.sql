-- Leases that ran out (a relay crashed, hung or lost its database connection): the attempt counts
-- as failed and is logged; the delivery is due again at once, or dead if its schedule is spent.
WITH expired AS (
    SELECT d.id, d.event_id, d.handler_id, d.attempts, d.lease_owner, d.updated_at,
           coalesce(cardinality(h.retry_schedule_ms), $1::int) + 1 AS max_attempts,
           h.name AS handler_name
      FROM provisioning.deliveries d
      LEFT JOIN provisioning.handlers h ON h.id = d.handler_id
     WHERE d.status = 'running' AND d.lease_expires_at < now()
     ORDER BY d.lease_expires_at
     LIMIT 1000
       FOR UPDATE OF d SKIP LOCKED
), recovered AS (
    UPDATE provisioning.deliveries d
       SET status = CASE WHEN x.attempts >= x.max_attempts THEN 'dead' ELSE 'pending' END,
           next_attempt_at = least(d.next_attempt_at, now()),  -- due at once, in its old place
           last_error = format('lease expired: relay %s did not report the attempt in time', x.lease_owner),
           lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
      FROM expired x
     WHERE d.id = x.id
 RETURNING d.id
)
INSERT INTO provisioning.attempts
    (delivery_id, event_id, handler_id, handler_name, event_name, object_id, attempt, started_at,
     duration_ms, outcome, request_body, error, relay)
SELECT x.id, x.event_id, x.handler_id, coalesce(x.handler_name, '?'), coalesce(e.name, '?'), coalesce(e.object_id #>> '{}', ''),
       x.attempts, x.updated_at, extract(epoch FROM now() - x.updated_at) * 1000, 'fail', '',
       format('lease expired: relay %s did not report the attempt in time', x.lease_owner), $2
  FROM expired x
  JOIN recovered r ON r.id = x.id
  LEFT JOIN provisioning.events e ON e.id = x.event_id
