-- bench/capture.sh VARIANT=unlogged: the outbox without WAL. An experiment, never for production
-- (an unlogged table is emptied by a crash). It separates what capture costs the writers in WAL
-- (bytes, flushes) from what it costs them in CPU: on a machine bound by WAL flushes the two
-- ratios came out the same (README, "Bound by WAL flushes, yet paid in CPU").
ALTER TABLE provisioning.deliveries SET UNLOGGED;
ALTER TABLE provisioning.events SET UNLOGGED;
