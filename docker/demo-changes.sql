-- A few realistic changes, so `docker compose up` shows deliveries.
INSERT INTO clients (name, balance, currency) VALUES ('Customer A', 10, 'USD');
UPDATE clients SET balance = -5 WHERE name = 'Customer A';
UPDATE clients SET balance = 20 WHERE name = 'Customer A';
INSERT INTO client_packages (client_id, package_name) SELECT id, 'Unlimited EU' FROM clients WHERE name = 'Customer A';
UPDATE client_packages SET status = 'active', paid_until = current_date + 30 WHERE package_name = 'Unlimited EU';
