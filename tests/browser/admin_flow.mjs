// Drives the ArkNet admin page (src/admin/page.html) in a real headless Chromium, one step of
// the owner's flow per run; tests/admin_page.rs runs the steps and checks the mesh in between.
//
//   node admin_flow.mjs '<json>'
//
// json: {"step": "...", "url": "http://127.x.y.z:port/", "shots": "<dir for PNGs>",
//        "profile": "<fresh user-data-dir>", "chromium": "/usr/bin/chromium", ...step arguments}
//
// Prints one line per screenshot ("screenshot: <path>") and "ok: <step>" at the end; exits 1
// with the reason (and a *-FAILED.png screenshot) when something on the page is not as expected.
// Only loopback traffic: any request the page makes to another origin fails the step.

import { chromium } from "playwright-core";
import path from "node:path";
import fs from "node:fs";

const WAIT_MS = 15000;
const WATCHDOG_MS = 90000;

const args = JSON.parse(process.argv[2] ?? "{}");
for (const k of ["step", "url", "shots", "profile"]) {
  if (!args[k]) fail(`missing argument "${k}"`);
}
fs.mkdirSync(args.shots, { recursive: true });

const watchdog = setTimeout(() => fail(`step ${args.step} did not finish within ${WATCHDOG_MS / 1000} s`), WATCHDOG_MS);

function fail(msg) {
  console.error(`admin_flow: ${msg}`);
  process.exit(1);
}

function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

const context = await chromium.launchPersistentContext(args.profile, {
  executablePath: args.chromium || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 900 },
  timeout: 30000,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    // A test may point a made-up name at a loopback address (DNS rebinding, without DNS).
    ...(args.resolver_rules ? [`--host-resolver-rules=${args.resolver_rules}`] : []),
  ],
});
context.setDefaultTimeout(WAIT_MS);
const page = context.pages()[0] ?? (await context.newPage());
const origin = new URL(args.url).origin;
const problems = [];
page.on("pageerror", (e) => problems.push(`uncaught error in the page: ${e.message}`));
page.on("request", (r) => {
  const u = r.url();
  if (!page.allowOtherOrigins && !u.startsWith(origin + "/") && !u.startsWith("data:") && !u.startsWith("about:")) {
    problems.push(`the page requested another origin: ${u}`);
  }
});
page.on("dialog", (d) => {
  // Only the Revoke confirmation is expected; it is accepted when a step arms `acceptConfirm`.
  if (d.type() === "confirm" && page.acceptConfirm) {
    page.confirmSeen = d.message();
    d.accept();
  } else {
    problems.push(`unexpected ${d.type()} dialog: ${d.message()}`);
    d.dismiss();
  }
});

async function shot(name) {
  const file = path.join(args.shots, `${args.prefix ?? ""}${args.step}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot: ${file}`);
}

const css = (s) => s.replace(/["\\]/g, "\\$&");
const discoveredRow = (key) => page.locator(`tr[data-testid="discovered-row"][data-key="${css(key)}"]`);
const peerCard = (key) => page.locator(`article[data-testid="peer-card"][data-key="${css(key)}"]`);
const modelRow = (m) => page.locator(`tr[data-testid="model-row"][data-model="${css(m)}"]`);

async function open(url) {
  if (args.preset_token) {
    // Through a proxy every read needs the token: store it the way the page's token box does.
    await page.goto(url, { waitUntil: "load" });
    await page.evaluate((t) => localStorage.setItem("arknet.adminToken", t), args.preset_token);
  }
  await page.goto(url, { waitUntil: "load" });
  await page.locator("#conn-status[data-state='live']").waitFor();
  if (args.self_node_id) {
    await page.locator("#node-id").filter({ hasText: args.self_node_id }).waitFor();
  }
}

async function expectValue(selector, want, what) {
  const got = await page.locator(selector).inputValue();
  check(got === want, `${what}: expected ${JSON.stringify(want)}, the form shows ${JSON.stringify(got)}`);
}

async function flashText() {
  const f = page.locator("#flash");
  return (await f.isVisible()) ? (await f.innerText()).trim() : "";
}

async function waitFlash(kind, contains) {
  const f = page.locator(`#flash[data-kind="${kind}"]`);
  await f.filter({ hasText: contains }).waitFor({ state: "visible" });
}

const steps = {
  // The stranger is listed as pending; the owner approves it sharing `share` only.
  async approve() {
    const peer = args.peer;
    await open(args.url);

    // Copy the node's key (clipboard API; the page falls back to execCommand elsewhere).
    await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin });
    await page.locator("#copy-node-key").click();
    await page.locator("#copy-node-key").filter({ hasText: /Copied/ }).waitFor();
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    const shown = (await page.locator("#node-key").innerText()).trim();
    check(copied === shown && shown.length === 44, `Copy put ${JSON.stringify(copied)} on the clipboard, the key is ${shown}`);

    const row = discoveredRow(peer.public_key);
    await row.and(page.locator('[data-state="pending"]')).waitFor();
    const rowText = await row.innerText();
    check(rowText.includes(peer.node_id), `pending row names ${peer.node_id}: ${rowText}`);
    for (const m of args.local_models) await modelRow(m).waitFor();
    await shot("pending");

    await row.getByRole("button", { name: "Approve…" }).click();
    const dialog = page.locator("#peer-dialog");
    await dialog.waitFor({ state: "visible" });
    await expectValue("#f-node-id", peer.node_id, "node id prefilled from the sighting");
    await expectValue("#f-public-key", peer.public_key, "public key");
    if (peer.endpoint) await expectValue("#f-endpoint", peer.endpoint, "endpoint prefilled from the sighting");
    await expectValue("#f-max-concurrent", "1", "max concurrent requests default");
    check(await page.locator("#f-can-request-inference").isChecked(), "can_request_inference is on by default");
    check(!(await page.locator("#f-can-pull-models").isChecked()), "can_pull_models is off by default");
    const offered = await page.locator('#f-models input[name="models_shared"]').evaluateAll((els) => els.map((e) => e.value));
    check(JSON.stringify([...offered].sort()) === JSON.stringify([...args.local_models].sort()),
      `the form offers this node's local models ${JSON.stringify(args.local_models)}, not ${JSON.stringify(offered)}`);
    for (const m of args.share) {
      await page.getByRole("checkbox", { name: m, exact: true }).check();
    }
    await page.getByLabel("Name").fill(args.name ?? "");
    if (args.endpoint) await page.getByLabel("Endpoint").fill(args.endpoint);
    await shot("approve-form");
    await page.getByRole("button", { name: "Approve", exact: true }).click();
    await dialog.waitFor({ state: "hidden" });
    await waitFlash("success", `Approved ${peer.node_id}`);

    const card = peerCard(peer.public_key);
    await card.waitFor();
    const shared = (await card.locator('[data-testid="models-we-share"]').innerText()).trim();
    check(shared.split(/\s+/).sort().join(" ") === [...args.share].sort().join(" "),
      `the card shows we share ${JSON.stringify(shared)}, expected ${JSON.stringify(args.share)}`);
    await discoveredRow(peer.public_key).and(page.locator('[data-state="approved"]')).waitFor();
    if (args.expect_shared_with_us) {
      await card.locator('[data-testid="reachability"]').filter({ hasText: /^reachable$/ }).waitFor();
      for (const m of args.expect_shared_with_us) {
        await card.locator('[data-testid="models-shared-with-us"]').filter({ hasText: m }).waitFor();
        await modelRow(m).filter({ hasText: peer.node_id }).waitFor();
      }
    }
    await shot("approved");
  },

  // The owner edits the peer's permissions: same form, PATCH.
  async edit() {
    const peer = args.peer;
    await open(args.url);
    const card = peerCard(peer.public_key);
    await card.getByRole("button", { name: /^Edit/ }).click();
    const dialog = page.locator("#peer-dialog");
    await dialog.waitFor({ state: "visible" });
    await expectValue("#f-node-id", peer.node_id, "node id");
    for (const m of args.local_models) {
      const box = page.getByRole("checkbox", { name: m, exact: true });
      check((await box.isChecked()) === args.share.includes(m), `edit form: ${m} checked = ${args.share.includes(m)}`);
    }
    check(await page.locator("#f-endpoint").isHidden(), "endpoint is not editable through PATCH");
    await page.getByLabel("Max concurrent requests").fill(String(args.max_concurrent));
    await shot("edit-form");
    await page.getByRole("button", { name: "Save changes" }).click();
    await dialog.waitFor({ state: "hidden" });
    await waitFlash("success", `Saved ${peer.node_id}`);
    await card.locator('[data-testid="in-flight"]').filter({ hasText: `of ${args.max_concurrent}` }).waitFor();
  },

  // The audit log shows the peer's requests; the owner revokes the peer.
  async revoke() {
    const peer = args.peer;
    await open(args.url);
    for (const a of args.expect_audit ?? []) {
      await page.locator(`tr[data-testid="audit-row"][data-model="${css(a.model)}"][data-status="${a.status}"]`).first().waitFor();
    }
    await shot("audit");
    page.acceptConfirm = true;
    await peerCard(peer.public_key).getByRole("button", { name: "Revoke" }).click();
    await waitFlash("success", `Revoked ${peer.node_id}`);
    check((page.confirmSeen ?? "").includes(peer.node_id), `the confirmation names the peer: ${page.confirmSeen}`);
    await peerCard(peer.public_key).waitFor({ state: "detached" });
    await discoveredRow(peer.public_key).and(page.locator('[data-state="revoked"]')).waitFor();
    await discoveredRow(peer.public_key).getByRole("button", { name: "Approve again…" }).waitFor();
    await shot("revoked");
    if (args.also_url) {
      // The same page at /admin: relative URLs resolve to the same API.
      await open(args.also_url);
      await discoveredRow(peer.public_key).and(page.locator('[data-state="revoked"]')).waitFor();
    }
  },

  // Through a proxy: a change without the token is refused and the server's message is shown;
  // the token typed into the form (then into the token box) lets changes through.
  async token() {
    const peer = args.peer;
    await page.goto(args.url, { waitUntil: "load" });
    // Reads are private too: without the token the page says so and shows nothing of the node.
    const locked = page.locator("#conn-status[data-state='locked']");
    await locked.waitFor();
    check((await locked.innerText()).includes("token"), `the page asks for the token: ${await locked.innerText()}`);
    check((await page.locator("#node-id").innerText()).trim() !== args.self_node_id, "the node id is shown without the token");
    await shot("locked-401");
    await page.locator("#admin-token").fill(args.admin_token);
    await page.locator("#save-token").click();
    await page.locator("#conn-status[data-state='live']").waitFor();
    await page.locator("#node-id").filter({ hasText: args.self_node_id }).waitFor();
    const card = peerCard(peer.public_key);
    await card.waitFor();
    await shot("unlocked");

    // Cleared again: a change is refused with the server's message, and the form can save the
    // token and retry.
    await page.getByRole("button", { name: "Clear" }).click();
    await page.locator("#token-state").filter({ hasText: "No token saved" }).waitFor();
    await card.getByRole("button", { name: /^Edit/ }).click();
    await page.getByLabel("Max concurrent requests").fill("3");
    await page.getByRole("button", { name: "Save changes" }).click();
    const formError = page.locator("#peer-form-error");
    await formError.filter({ hasText: "401" }).waitFor();
    const msg = await formError.innerText();
    check(msg.includes(args.expect_401_message), `the form shows the server's message: ${msg}`);
    await shot("edit-refused-401");
    await page.locator("#f-token").fill(args.admin_token);
    await page.getByRole("button", { name: "Save token and retry" }).click();
    await page.locator("#peer-dialog").waitFor({ state: "hidden" });
    await waitFlash("success", `Saved ${peer.node_id}`);
    await card.locator('[data-testid="in-flight"]').filter({ hasText: "of 3" }).waitFor();
    const stored = await page.evaluate(() => localStorage.getItem("arknet.adminToken"));
    check(stored === args.admin_token, "the token is kept in localStorage");
    await page.locator("#token-state").filter({ hasText: "saved in this browser" }).waitFor();

    // Without the token again, a revoke is refused with the message in the page's banner.
    await page.getByRole("button", { name: "Clear" }).click();
    await page.locator("#token-state").filter({ hasText: "No token saved" }).waitFor();
    page.acceptConfirm = true;
    await card.getByRole("button", { name: "Revoke" }).click();
    await waitFlash("error", args.expect_401_message);
    check((await flashText()).includes("401"), "the banner says HTTP 401");
    await card.waitFor();
    await shot("revoke-refused-401");

    await page.locator("#admin-token").fill(args.admin_token);
    await page.getByRole("button", { name: "Save token", exact: true }).click();
    await page.locator("#token-state").filter({ hasText: "saved in this browser" }).waitFor();
    await card.getByRole("button", { name: "Revoke" }).click();
    await waitFlash("success", `Revoked ${peer.node_id}`);
    await card.waitFor({ state: "detached" });
    await shot("revoked-with-token");
  },

  // A hostile page on another origin (`evil_url`) tries to change and read the node's
  // approvals with fetch() and an auto-submitted form; it reports what it saw in #report.
  // Then a rebound name (`rebind_url`, mapped to the node by `resolver_rules`) is opened.
  async attack() {
    page.allowOtherOrigins = true;
    await page.goto(args.evil_url, { waitUntil: "load" });
    await page.locator("#done").waitFor({ state: "attached" });
    console.log(`attack report:\n${await page.locator("#report").innerText()}`);
    await shot("hostile-page");
    if (args.rebind_url) {
      const rsp = await page.goto(args.rebind_url, { waitUntil: "load" });
      check(rsp && rsp.status() === 421, `the rebound name ${args.rebind_url} got ${rsp && rsp.status()}`);
      console.log(`rebound name: ${rsp.status()}`);
      await shot("rebound-name");
    }
  },

  // The approvals-file warning banner follows /status.
  async banner() {
    await open(args.url);
    const banner = page.locator("#approvals-warning");
    if (args.expect_visible) {
      await banner.filter({ hasText: args.expect_text }).waitFor({ state: "visible" });
      await shot("approvals-file-invalid");
    } else {
      await banner.waitFor({ state: "hidden" });
    }
  },
};

const run = steps[args.step];
if (!run) fail(`unknown step "${args.step}"`);
try {
  await run();
  // Let one more poll run so that errors thrown by it are caught too.
  await page.waitForTimeout(100);
  if (problems.length) throw new Error(problems.join("\n"));
  console.log(`ok: ${args.step}`);
} catch (e) {
  const flash = await flashText().catch(() => "");
  try {
    const file = path.join(args.shots, `${args.prefix ?? ""}${args.step}-FAILED.png`);
    await page.screenshot({ path: file, fullPage: true });
    console.log(`screenshot: ${file}`);
  } catch (_) { /* the page may be gone */ }
  await context.close().catch(() => {});
  fail(`step ${args.step}: ${e.message}${problems.length ? "\n" + problems.join("\n") : ""}${flash ? "\nflash on the page: " + flash : ""}`);
}
clearTimeout(watchdog);
await context.close();
