-- pgbench script for bench/capture.sh: one single-row balance update per transaction.
-- Balances start spread over -50..50 and move by -10..10, so a few percent of the updates cross
-- zero and emit clients.balance_zero / clients.balance_notzero; the rest emit nothing.
\set id random(1, :rows)
\set delta random(-10, 10)
UPDATE clients SET balance = balance + :delta WHERE id = :id;
