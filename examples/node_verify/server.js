// An HTTP handler in Node.js that verifies the Standard Webhooks signature before trusting a
// delivery. No dependencies (node:crypto, node:http).
//
//   WEBHOOK_SECRET=whsec_... PORT=5001 node server.js
//   relay handlers add crm --event 'clients.*' --http http://127.0.0.1:5001/hooks --secret-env WEBHOOK_SECRET
//
// Replies 200 to a valid delivery, 401 to a bad signature, 400 to a stale timestamp. Use the
// webhook-id header as the idempotency key: it is the same on every retry of a delivery.
"use strict";
const http = require("node:http");
const crypto = require("node:crypto");

const secret = process.env.WEBHOOK_SECRET || "";
const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
const TOLERANCE_S = 5 * 60;
const seen = new Set(); // idempotency: in real life, a table with a unique key

function verify(headers, body) {
  const id = headers["webhook-id"];
  const ts = headers["webhook-timestamp"];
  const sigs = (headers["webhook-signature"] || "").split(" ");
  if (!id || !ts || sigs.length === 0) return "missing webhook headers";
  if (Math.abs(Date.now() / 1000 - Number(ts)) > TOLERANCE_S) return "stale timestamp";
  const expected = crypto.createHmac("sha256", key).update(`${id}.${ts}.${body}`).digest();
  const ok = sigs.some((s) => {
    const [version, sig] = s.split(",");
    if (version !== "v1" || !sig) return false;
    const given = Buffer.from(sig, "base64");
    return given.length === expected.length && crypto.timingSafeEqual(given, expected);
  });
  return ok ? null : "bad signature";
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks).toString("utf8");
    const problem = verify(req.headers, body);
    if (problem) {
      console.log(`refused: ${problem}`);
      res.writeHead(problem === "stale timestamp" ? 400 : 401, { "content-type": "text/plain" });
      return res.end(problem);
    }
    const id = req.headers["webhook-id"];
    const msg = JSON.parse(body);
    console.log(`${seen.has(id) ? "duplicate" : "accepted"} ${id} ${msg.event.events_id} object ${msg.event.object_id}`);
    seen.add(id);
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ ok: true }));
  });
});
server.listen(Number(process.env.PORT || 5001), process.env.HOST || "127.0.0.1", () => {
  console.log(`listening on ${server.address().address}:${server.address().port}`);
});
