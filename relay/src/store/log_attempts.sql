-- The execution log: one row per attempt, whatever happened to the lease.
INSERT INTO provisioning.attempts
    (delivery_id, event_id, handler_id, handler_name, event_name, object_id, attempt, started_at,
     duration_ms, outcome, http_status, exit_code, request_body, response, error, relay)
SELECT t.delivery_id, t.event_id, t.handler_id, t.handler_name, t.event_name, t.object_id, t.attempt,
       t.started_at, t.duration_ms, t.outcome, t.http_status, t.exit_code, t.request_body, t.response,
       t.error, $16
  FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::int[],
              $8::timestamptz[], $9::float8[], $10::text[], $11::int[], $12::int[], $13::text[],
              $14::text[], $15::text[])
    AS t(delivery_id, event_id, handler_id, handler_name, event_name, object_id, attempt, started_at,
         duration_ms, outcome, http_status, exit_code, request_body, response, error)
