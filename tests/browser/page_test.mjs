// Drives the admin web page in headless Chromium (run by tests/integration/browser.rs):
//
//   node tests/browser/page_test.mjs <admin url> <token> <delivery id> <handler> <expected attempt ids> <screenshot>
//
// Loads the page, enters the token, filters the execution log by <handler> and status "fail",
// checks that exactly the expected attempts are shown (comma-separated ids, newest first), opens
// the delivery, presses Retry, waits for the confirmation, presses the handler's Test button, waits
// for its result and saves a screenshot. Prints one JSON
// line with what it saw; exits non-zero (after a screenshot of the failure) on any mismatch.
// The browser is never downloaded: CHROMIUM_PATH (default /usr/bin/chromium) is used.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const [url, token, deliveryArg, handler, expectedCsv, screenshot] = process.argv.slice(2);
if (!url || !token || !deliveryArg || !handler || expectedCsv === undefined || !screenshot) {
  console.error("usage: node page_test.mjs <admin url> <token> <delivery id> <handler> <expected ids> <screenshot>");
  process.exit(2);
}
const deliveryId = Number(deliveryArg);
const expected = expectedCsv.split(",").filter(Boolean).map(Number);
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}

const userDataDir = mkdtempSync(path.join(tmpdir(), "relay-chromium-"));
const pageErrors = [];
let context;
let page;
let exitCode = 0;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1400, height: 1000 },
    timeout: 60_000,
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30_000);
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() === "error") pageErrors.push(m.text());
  });
  page.on("response", (r) => {
    if (r.status() >= 400) pageErrors.push(`HTTP ${r.status()} for ${r.request().method()} ${r.url()}`);
  });

  await page.goto(url + "/");
  // The page loads status, handlers and the unfiltered log by itself.
  await page.waitForFunction(() => /^\d+ attempts shown$/.test(document.querySelector("#message").textContent));
  const unfiltered = await page.locator("#logs tbody tr").count();
  await page.waitForFunction(() => document.querySelector("#dead").textContent !== "…");
  // The test dropped the delete capture trigger of accounts: the page says so, with the mend.
  const problems = await page.$$eval("#problems:not([hidden]) li", (lis) => lis.map((li) => li.textContent));
  check(
    problems.length === 1 && problems[0].includes("public.accounts has delete events declared but no delete capture trigger")
      && problems[0].includes("SELECT provisioning.refresh('public.accounts')"),
    `capture problems shown: ${JSON.stringify(problems)}`,
  );
  // The test published an open circuit breaker for the handler, as a relay does: shown.
  const held = await page.$$eval("#circuits:not([hidden]) li", (lis) => lis.map((li) => li.textContent));
  check(
    held.length === 1 && held[0].startsWith(handler + ": held by relay r-breaker since ") && held[0].includes(", next probe "),
    `held handlers shown: ${JSON.stringify(held)}`,
  );
  const handlers = await page.$$eval("#handlers tbody tr", (trs) => trs.map((tr) => tr.dataset.name));
  check(handlers.includes(handler), `handler ${handler} listed in ${JSON.stringify(handlers)}`);

  // Token, then filter the log by handler and status.
  await page.fill("#token", token);
  await page.locator("#token").press("Tab");
  await page.fill('#filters input[name="handler"]', handler);
  await page.selectOption('#filters select[name="status"]', "fail");
  await page.evaluate(() => {
    document.querySelector("#message").textContent = "";
  });
  await page.click("#apply");
  await page.waitForFunction(() => /^\d+ attempts shown$/.test(document.querySelector("#message").textContent));
  const rows = await page.$$eval("#logs tbody tr", (trs) =>
    trs.map((tr) => ({
      id: Number(tr.dataset.id),
      delivery: Number(tr.dataset.delivery),
      cells: [...tr.children].map((td) => td.textContent),
    })),
  );
  check(
    JSON.stringify(rows.map((r) => r.id)) === JSON.stringify(expected),
    `filtered rows ${JSON.stringify(rows.map((r) => r.id))} == expected ${JSON.stringify(expected)}`,
  );
  check(unfiltered > rows.length, `the filter narrowed the log (${unfiltered} -> ${rows.length})`);
  for (const r of rows) {
    check(r.cells[1] === "fail", `row ${r.id} status ${r.cells[1]}`);
    check(r.cells[4] === handler, `row ${r.id} handler ${r.cells[4]}`);
  }

  // Open the delivery: its status and the request that was sent.
  await page.click(`#logs tbody tr[data-delivery="${deliveryId}"]`);
  await page.waitForFunction(
    (id) => !document.querySelector("#detail").hidden && document.querySelector("#detail-id").textContent === String(id),
    deliveryId,
  );
  const statusBefore = (await page.textContent("#detail-status")).trim();
  check(statusBefore === "dead", `delivery status shown as ${statusBefore}`);
  const request = await page.textContent("#detail-body pre.request");
  const sent = JSON.parse(request);
  check(sent.event && sent.event.events_id, `request body shown: ${request}`);
  const response = await page.textContent("#detail-body pre.response");
  check(response.length > 0, "response shown");

  // Retry, and wait for the confirmation.
  const deadBefore = Number(await page.textContent("#dead"));
  await page.click("#retry");
  await page.waitForFunction(
    (id) => {
      const m = document.querySelector("#message");
      return m.className === "ok" && m.textContent.startsWith(`delivery ${id} queued for retry`);
    },
    deliveryId,
  );
  const message = await page.textContent("#message");
  // The page shows the effect: the delivery is pending again, one dead fewer.
  await page.waitForFunction(() => document.querySelector("#detail-status").textContent === "pending");
  await page.waitForFunction((n) => document.querySelector("#dead").textContent === String(n), deadBefore - 1);

  // Test the handler: one event sent now, the reply and what it would mean shown.
  await page.click(`#handlers tbody tr[data-name="${handler}"] button.test`);
  await page.waitForFunction((h) => document.querySelector("#message").textContent.startsWith(`test of ${h}: `), handler);
  const testMessage = await page.textContent("#message");
  const testOutcome = await page.textContent("#test-outcome");
  const testResponse = await page.textContent("#test-body pre.response");
  const testRequest = JSON.parse(await page.textContent("#test-body pre.request"));
  check(!(await page.locator("#test").isHidden()), "the test section is shown");
  check(testRequest.event && testRequest.event.events_id, `test request shown: ${JSON.stringify(testRequest)}`);
  await page.screenshot({ path: screenshot, fullPage: true });
  check(pageErrors.length === 0, `no page errors: ${JSON.stringify(pageErrors)}`);
  console.log(
    JSON.stringify({
      ok: true,
      unfiltered,
      shown: rows.map((r) => r.id),
      status_before: statusBefore,
      dead_before: deadBefore,
      event: sent.event.events_id,
      message,
      test_message: testMessage,
      test_message_ok: (await page.getAttribute("#message", "class")) === "ok",
      test_outcome: testOutcome,
      test_response: testResponse,
      screenshot,
    }),
  );
} catch (e) {
  exitCode = 1;
  console.error(String(e && e.stack ? e.stack : e));
  if (pageErrors.length) console.error("page errors: " + JSON.stringify(pageErrors));
  if (page) {
    try {
      console.error("message: " + (await page.textContent("#message")));
      await page.screenshot({ path: screenshot, fullPage: true });
      console.error("screenshot of the failure: " + screenshot);
    } catch {
      // the page itself is gone
    }
  }
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(exitCode);
