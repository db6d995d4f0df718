// Drives the hub's dashboard (/ui) in Debian's headless Chromium. Started by
// crates/concord/tests/it/ui.rs, which seeds the hub and passes in the env:
//   CONCORD_URL, ADMIN_TOKEN, READER_TOKEN, ALPHA_PRIMARY, BETA_PRIMARY,
//   ALPHA_SECONDARY (the transfer target), GHOST, MEMORY_QUERY, MEMORY_TEXT,
//   MEMORY_WRITER, SCREENSHOT_DIR, CHROMIUM (default /usr/bin/chromium).
// Prints one line per check and "OK" at the end; any failure exits non-zero.
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`missing env ${name}`);
  return v;
};
const URL_ = env('CONCORD_URL');
const ADMIN = env('ADMIN_TOKEN');
const READER = env('READER_TOKEN');
const SHOTS = env('SCREENSHOT_DIR');

const step = (what) => console.log(`- ${what}`);
const fail = (what) => { throw new Error(what); };

async function hub(method, path, token, body) {
  const resp = await fetch(`${URL_}${path}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => null);
  if (!resp.ok) fail(`${method} ${path}: ${resp.status} ${JSON.stringify(data)}`);
  return data;
}

const primaryOf = async (entity) => (await hub('GET', `/v1/entities/${entity}`, ADMIN)).primary?.id;

async function login(browser, token) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
  // Nothing may be loaded from anywhere but the hub.
  page.on('request', (r) => { if (!r.url().startsWith(URL_)) problems.push(`external request: ${r.url()}`); });
  await page.goto(`${URL_}/ui`);
  if (!page.url().endsWith('/ui/login')) fail(`no session should land on the login page, got ${page.url()}`);
  await page.getByLabel('Token').fill(token);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.waitForURL(`${URL_}/ui`);
  await page.locator('#live.on').waitFor({ timeout: 10000 }).catch((e) => {
    fail(`the event stream did not connect: ${e.message}\n${problems.join('\n')}`);
  });
  return { context, page, problems };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

try {
  // ---- a wrong token is refused with a reason ----
  {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(`${URL_}/ui/login`);
    await page.getByLabel('Token').fill('cnc_not_a_token');
    await page.getByRole('button', { name: 'Log in' }).click();
    const err = await page.locator('#login-error').textContent();
    if (!/unknown or revoked/.test(err)) fail(`login error says ${err}`);
    await context.close();
    step('a wrong token is refused on the login page');
  }

  const admin = await login(browser, ADMIN);
  const { page } = admin;
  step('admin logged in; the stream is live');

  // ---- the fleet: two entities, the right primaries, a ghost in red ----
  for (const [entity, primary] of [['alpha', env('ALPHA_PRIMARY')], ['beta', env('BETA_PRIMARY')]]) {
    const row = page.locator(`article[data-entity="${entity}"] li.inst[data-kind="primary"]`);
    await row.waitFor();
    const id = await row.getAttribute('data-instance');
    if (id !== primary) fail(`${entity}: primary on screen is ${id}, expected ${primary}`);
    const epoch = await page.locator(`article[data-entity="${entity}"] .epoch`).textContent();
    if (!/^epoch \d+$/.test(epoch)) fail(`${entity}: epoch shows ${epoch}`);
  }
  step('two entities with the right primaries and their epochs');
  const ghost = page.locator(`li.inst.ghost[data-instance="${env('GHOST')}"]`);
  await ghost.waitFor();
  const ghostBg = await ghost.evaluate((el) => getComputedStyle(el).backgroundColor);
  const [r, g, b] = ghostBg.match(/\d+/g).map(Number);
  if (!(r > g + 20 && r > b + 20)) fail(`the ghost row is not red: ${ghostBg}`);
  await page.locator(`li.inst[data-instance="${env('ALPHA_SECONDARY')}"] .badge.persistent`).waitFor();
  await page.locator('article[data-entity="alpha"] li.inst[data-kind="fork"]', { hasText: 'fork of' }).waitFor();
  step('ghost flagged in red, persistent secondary marked, fork with its age');

  // ---- the overview at 1280x800, saved for CI ----
  await page.screenshot({ path: `${SHOTS}/ui-overview.png` });
  step(`screenshot ${SHOTS}/ui-overview.png`);

  // ---- keyboard: the first Tab reaches the skip link, then the navigation ----
  await page.keyboard.press('Tab');
  if ((await page.evaluate(() => document.activeElement.textContent)) !== 'Skip to content') fail('first Tab is not the skip link');
  step('keyboard: skip link first');

  // ---- an instance that stops heartbeating turns expired within TTL + 2 s ----
  const ttl = 1500;
  const reg = await hub('POST', '/v1/instances', ADMIN, { entity: 'beta', label: 'short-lived', ttl_ms: ttl });
  const registeredAt = Date.now();
  const doomed = page.locator(`li.inst[data-instance="${reg.instance.id}"]`);
  await doomed.waitFor({ timeout: ttl });
  await page.locator(`li.inst[data-instance="${reg.instance.id}"] .state-expired`).waitFor({ timeout: ttl + 2000 });
  const took = Date.now() - registeredAt;
  if (took > ttl + 2000) fail(`expired on screen after ${took} ms`);
  step(`an instance with TTL ${ttl} ms showed expired ${took} ms after its last heartbeat, without reload`);

  // ---- memory: recall with provenance, trust and visibility ----
  await page.getByRole('link', { name: 'Memory' }).click();
  await page.waitForURL(`${URL_}/ui/memory`);
  await page.getByLabel('Recall').fill(env('MEMORY_QUERY'));
  await page.getByRole('button', { name: 'Search' }).click();
  const hit = page.locator('article.hit', { hasText: env('MEMORY_TEXT') }).first();
  await hit.waitFor();
  const hitText = await hit.textContent();
  for (const want of [env('MEMORY_WRITER'), 'entity alpha', 'visibility:', 'trusted by']) {
    if (!hitText.includes(want)) fail(`the hit does not show ${want}: ${hitText}`);
  }
  step('memory search shows the hit with provenance, visibility and trust');
  await hit.getByRole('button', { name: 'history' }).click();
  await page.locator('#history article.hit').first().waitFor();
  step('memory history shown');
  await page.screenshot({ path: `${SHOTS}/ui-memory.png`, fullPage: true });

  // ---- instance detail: the process that `concord run` reports ----
  await page.goto(`${URL_}/ui/instances/${env('ALPHA_SECONDARY')}`);
  const detail = page.locator('#instance');
  await detail.getByText('process up, endpoint up', { exact: true }).waitFor();
  for (const want of ['4242', 'restarts', '/srv/alpha', 'review']) {
    if (!(await detail.textContent()).includes(want)) fail(`instance detail lacks ${want}`);
  }
  await page.locator('#inst-events li[data-topic="sys.instance.registered"]').waitFor();
  await page.screenshot({ path: `${SHOTS}/ui-instance.png`, fullPage: true });
  step('instance detail with process, capabilities and its events');

  // ---- other pages render without errors ----
  for (const [link, sel] of [['Queues', '#queues table'], ['Events', '#tail li'], ['Breakers & leases', '#leases'], ['Tokens', '#tokens table']]) {
    await page.getByRole('link', { name: link, exact: true }).click();
    await page.locator(sel).first().waitFor();
  }
  await page.goto(`${URL_}/ui/queues`);
  await page.locator('#dead td.err', { hasText: 'fatal: disk full' }).waitFor();
  await page.locator('#queues svg.spark').first().waitFor();
  await page.screenshot({ path: `${SHOTS}/ui-queues.png`, fullPage: true });
  step('queues (dead task with its error, sparkline), events, breakers & leases, tokens');

  // ---- admin: transfer of primary, asked first ----
  await page.goto(`${URL_}/ui`);
  const to = env('ALPHA_SECONDARY');
  const button = page.locator(`button[data-key="transfer-${to}"]`);
  await button.click();
  await page.locator('dialog#confirm[open]').waitFor();
  await page.getByRole('button', { name: 'Cancel' }).click();
  if ((await primaryOf('alpha')) !== env('ALPHA_PRIMARY')) fail('cancelling the confirmation still transferred');
  await button.click();
  await page.locator('dialog#confirm[open]').waitFor();
  await page.getByRole('button', { name: 'Transfer primary' }).click();
  await page.locator(`article[data-entity="alpha"] li.inst[data-kind="primary"][data-instance="${to}"]`).waitFor();
  if ((await primaryOf('alpha')) !== to) fail('the hub does not agree that the transfer happened');
  step('admin transferred the primary after confirming (cancel changed nothing)');

  // ---- phone width: no sideways scrolling, cards stacked ----
  await page.setViewportSize({ width: 390, height: 844 });
  await page.locator('article[data-entity="alpha"]').waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 1) fail(`the overview scrolls sideways by ${overflow}px at phone width`);
  await page.screenshot({ path: `${SHOTS}/ui-overview-phone.png`, fullPage: true });
  step('usable at phone width');
  if (admin.problems.length) fail(admin.problems.join('\n'));
  await admin.context.close();

  // ---- a reader sees everything, may change nothing ----
  const reader = await login(browser, READER);
  const rp = reader.page;
  await rp.locator('article[data-entity="alpha"] li.inst[data-kind="primary"]').waitFor();
  if (await rp.locator('button[data-key^="transfer-"], button[data-key^="close-"]').count()) fail('a reader is offered admin buttons');
  if (await rp.getByRole('link', { name: 'Tokens' }).count()) fail('a reader is offered the tokens page');
  // The same path a button takes: confirm, then the hub says no.
  const back = env('ALPHA_PRIMARY');
  const attempt = rp.evaluate((id) => window.concord.act({
    title: 'Transfer the primary role?', text: 'test', verb: 'Transfer primary', method: 'POST',
    path: '/v1/entities/alpha/primary/transfer', body: { to: id }, done: 'transferred',
  }), back);
  await rp.locator('dialog#confirm[open]').waitFor();
  await rp.getByRole('button', { name: 'Transfer primary' }).click();
  if (await attempt) fail('the reader\'s transfer was reported as done');
  const toastText = await rp.locator('#toast').textContent();
  if (!/^Refused: /.test(toastText)) fail(`the reader was told: ${toastText}`);
  if ((await primaryOf('alpha')) !== to) fail('a reader changed the primary');
  step(`a reader is denied an admin action: "${toastText}"`);
  if (reader.problems.filter((p) => !p.includes('403')).length) fail(reader.problems.join('\n'));
  await reader.context.close();

  console.log('OK');
} finally {
  await browser.close();
}
