-- Claim up to $2[i] due deliveries for handler $1[i], earliest due first, each only if no earlier
-- delivery of the same handler and object is unfinished (per-object order). Row locks are held
-- only by this statement: ownership lives in lease columns, and the claim commits at once.
-- $3 relay name, $4 claim token, $5[i] lease length in ms for handler $1[i], $6[i] whether handler
-- $1[i] needs the old and new row images (only the `full` format sends them; others get NULLs).
WITH candidates AS (
    SELECT c.id
      FROM unnest($1::bigint[], $2::int[]) AS h(handler_id, lim)
      -- The handler's status is checked here too, not only in the relay's cache: a handler paused
      -- a moment ago (410 Gone, an operator) gets nothing more.
      JOIN provisioning.handlers hd ON hd.id = h.handler_id AND hd.status = 'enabled'
     CROSS JOIN LATERAL (
        SELECT d.id
          FROM provisioning.deliveries d
         WHERE d.handler_id = h.handler_id
           AND d.status = 'pending'
           AND d.next_attempt_at <= now()
           -- Only the head of its object's queue: the oldest unfinished delivery of this handler
           -- and object. A scalar subquery is one index probe per candidate (it cannot turn into
           -- a hash anti-join, which made a long backlog of one object quadratic).
           AND d.id = (
                SELECT e.id FROM provisioning.deliveries e
                 WHERE e.handler_id = d.handler_id
                   AND e.entity = d.entity
                   AND e.object_key = d.object_key
                   AND e.status IN ('waiting', 'pending', 'running')
                 ORDER BY e.id
                 LIMIT 1)
           AND NOT EXISTS (
                -- an earlier event of this object still has its before-stage decision pending
                SELECT 1 FROM provisioning.deliveries b
                 WHERE b.entity = d.entity
                   AND b.object_key = d.object_key
                   AND b.stage = 'before'
                   AND b.event_id < d.event_id
                   AND b.status IN ('waiting', 'pending', 'running'))
         -- the order of index deliveries_due: the scan ends at the first delivery not yet due
         ORDER BY d.next_attempt_at, d.id
         LIMIT h.lim
           FOR UPDATE SKIP LOCKED
     ) c
), claimed AS (
    UPDATE provisioning.deliveries d
       SET status = 'running',
           attempts = d.attempts + 1,
           lease_owner = $3,
           lease_token = $4,
           lease_expires_at = now() + l.lease_ms * interval '1 millisecond',
           updated_at = now()
      FROM unnest($1::bigint[], $5::int[], $6::boolean[]) AS l(handler_id, lease_ms, row_images)
     -- the candidates as an array: primary-key lookups (a join let the planner hash the queue)
     WHERE d.id = ANY (ARRAY(SELECT id FROM candidates))
       AND l.handler_id = d.handler_id
 RETURNING d.id, d.event_id, d.handler_id, d.attempts, d.data, d.stage, l.row_images
)
SELECT cl.id, cl.handler_id, cl.attempts, cl.stage, cl.data AS modified_data,
       e.id AS event_id, e.name, e.entity, e.object_id, e.operation, e.data,
       CASE WHEN cl.row_images THEN e.old_row END AS old_row,
       CASE WHEN cl.row_images THEN e.new_row END AS new_row,
       e.changed_at
  FROM claimed cl
  -- one index probe per claimed row, never a hash join over the whole events table
 CROSS JOIN LATERAL (SELECT * FROM provisioning.events ev WHERE ev.id = cl.event_id LIMIT 1) e
 ORDER BY cl.id
