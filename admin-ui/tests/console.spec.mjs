// The console in a real Chromium (Debian's /usr/bin/chromium, headless,
// driven by playwright-core), against a real `prism up`. Run by
// tests/console.rs, which starts Prism, applies the quickstart and passes:
//
//   PRISM_ADMIN_URL     the admin API (and console) base URL
//   PRISM_PROXY_URL     the proxy's base URL; the quickstart answers for Host demo.local
//   PRISM_ADMIN_TOKEN   an admin token
//   PRISM_VIEWER_TOKEN  a viewer token
//   PRISM_SCREENSHOTS   where to write the screenshots
//   PRISM_CHROMIUM      the browser (default /usr/bin/chromium)
//
// The tests run in order and share one page, as an operator would: sign in,
// edit a route and watch the proxy serve it, roll it back, watch an
// endpoint's health on the backends page, watch traffic, then sign in again
// as a viewer. Every wait is bounded and waits for an
// event or a condition; none sleeps a fixed time.

import { after, afterEach, before, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through \`cargo test --test console\``);
  return value;
}

const ADMIN = required('PRISM_ADMIN_URL');
const PROXY = required('PRISM_PROXY_URL');
const ADMIN_TOKEN = required('PRISM_ADMIN_TOKEN');
const VIEWER_TOKEN = required('PRISM_VIEWER_TOKEN');
const SCREENSHOTS = required('PRISM_SCREENSHOTS');
const CHROMIUM = process.env.PRISM_CHROMIUM || '/usr/bin/chromium';

/** The bound on every wait. */
const WAIT_MS = 20000;
const CONSOLE_ANSWER = 'hello from the console';
const DEMO_ANSWER = 'Hello from the Prism demo upstream';

let browser;
let page;
/** What the page must never do: CSP violations, uncaught errors. */
const problems = [];

before(async () => {
  await mkdir(SCREENSHOTS, { recursive: true });
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, locale: 'en-GB', timezoneId: 'UTC' });
  context.setDefaultTimeout(WAIT_MS);
  page = await context.newPage();
  page.on('pageerror', (error) => problems.push(`uncaught: ${error.message}`));
  page.on('console', (message) => {
    // Refused API calls (400, 401, 412) are logged by Chromium as failed
    // loads; the tests cause those on purpose. A CSP violation or a script
    // error is never on purpose.
    const text = message.text();
    if (message.type() === 'error' && !/Failed to load resource/.test(text)) problems.push(text);
  });
});

afterEach(() => {
  const seen = problems.splice(0);
  assert.deepEqual(seen, [], 'the page logged errors (a CSP violation, an exception)');
});

after(async () => {
  if (browser) await browser.close();
});

/** Polls `check` until it returns a truthy value, for at most WAIT_MS. */
async function until(what, check) {
  const deadline = Date.now() + WAIT_MS;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${WAIT_MS} ms waiting for ${what} (last: ${last})`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** `GET path` through the proxy with `Host: demo.local`: `{status, body}`. */
function proxyGet(path) {
  return new Promise((resolve, reject) => {
    const request = http.get(`${PROXY}${path}`, { headers: { host: 'demo.local' } }, (response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk) => (body += chunk));
      response.on('end', () => resolve({ status: response.statusCode, body }));
    });
    request.on('error', reject);
    request.setTimeout(5000, () => request.destroy(new Error('the proxy did not answer in 5 s')));
  });
}

/** A call of the admin API from the test itself (another operator). */
async function adminCall(path, { method = 'GET', body, headers = {} } = {}) {
  const response = await fetch(`${ADMIN}${path}`, {
    method,
    body,
    headers: { Authorization: `Bearer ${ADMIN_TOKEN}`, ...(body ? { 'Content-Type': 'application/yaml' } : {}), ...headers },
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

async function signIn(token) {
  if ((await page.locator('input[name=token]').count()) === 0) await page.goto(`${ADMIN}/ui/#/overview`);
  await page.locator('input[name=token]').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

async function go(hash) {
  await page.evaluate((h) => {
    window.location.hash = h;
  }, hash);
}

/**
 * Replaces the editor's whole text as a person would: select all, delete,
 * paste. (Pasting over a selection of several lines makes Chromium's
 * editing write a passing `style` attribute into the editable DOM, which
 * the CSP blocks, harmlessly, as CodeMirror redraws from its own state; the
 * tests fail on any CSP report, so they delete first.)
 */
async function setEditorText(text) {
  const content = page.locator('.cm-content');
  await content.click();
  await page.keyboard.press('ControlOrMeta+A');
  await page.keyboard.press('Backspace');
  await page.keyboard.insertText(text);
  const squeeze = (t) => t.replace(/\s+/g, ' ').trim();
  await until('the editor to hold the new text', async () => squeeze(await content.innerText()) === squeeze(text));
}

async function checkState(expected) {
  await page.locator(`[data-testid=check-state]:text-is("${expected}")`).waitFor();
}

async function shot(name) {
  await page.screenshot({ path: join(SCREENSHOTS, `${name}.png`) });
}

const ROUTE_99 = `routes:
  - name: demo/root
    match:
      prefix: /
    direct_response:
      status: 99
      body: ${CONSOLE_ANSWER}
`;
const ROUTE_OK = ROUTE_99.replace('status: 99', 'status: 200');

test('1. signs in with the admin token; a wrong token is refused', async () => {
  await signIn('prism_0000000000000000_nope');
  await page.locator('[data-testid=signin-error]').filter({ hasText: '401' }).waitFor();
  await signIn(ADMIN_TOKEN);
  await page.locator('[data-testid=whoami]').filter({ hasText: 'admin · admin' }).waitFor();
  const kept = await page.evaluate(() => sessionStorage.getItem('prism.token'));
  assert.equal(kept, ADMIN_TOKEN, 'the token is kept in sessionStorage');
  // The overview reads the API with it.
  const revision = await page.locator('[data-testid=revision]').textContent();
  assert.ok(Number(revision) >= 1, `revision ${revision}`);
});

let editedRevision;

test('2. a route changed in the editor, validated as typed, conflict shown, then applied: the proxy serves it', async () => {
  assert.match((await proxyGet('/')).body, new RegExp(DEMO_ANSWER));
  await go('#/routes');
  const row = page.locator('tr[data-name="demo/root"]');
  await row.getByRole('link', { name: 'Edit' }).click();
  await page.locator('.cm-content').filter({ hasText: 'backend: upstream' }).waitFor();

  // A status the server refuses: the error is drawn on that field.
  await setEditorText(ROUTE_99);
  await checkState('refused by the server');
  const field = await page.locator('[data-testid=error-field]').textContent();
  assert.equal(field, 'routes[0].direct_response.status');
  const marked = await page.locator('.cm-lintRange-error').allTextContents();
  assert.ok(marked.join('').includes('status: 99'), `the marked text: ${JSON.stringify(marked)}`);
  assert.ok(await page.locator('[data-testid=apply]').isDisabled(), 'no apply while refused');

  // Fixed: valid, and the diff is shown before anything is applied.
  await setEditorText(ROUTE_OK);
  await checkState('valid');
  const added = await page.locator('[data-testid=changes] .line.add').allTextContents();
  const removed = await page.locator('[data-testid=changes] .line.del').allTextContents();
  assert.ok(added.some((l) => l.includes(CONSOLE_ANSWER)), `added lines: ${added}`);
  assert.ok(removed.some((l) => l.includes('backend: upstream')), `removed lines: ${removed}`);
  await shot('editor');

  // Someone else writes meanwhile: the apply is refused with a visible 412.
  const other = await adminCall('/v1/apply', {
    method: 'POST',
    body: `namespaces:\n  - name: demo\n    hosts: [demo.local]\n    labels: {changed-by: "another operator at ${Date.now()}"}\n`,
  });
  assert.equal(other.status, 200, JSON.stringify(other.body));
  await page.locator('[data-testid=apply]').click();
  await page.locator('[data-testid=conflict]').filter({ hasText: '412' }).waitFor();
  assert.match((await proxyGet('/')).body, new RegExp(DEMO_ANSWER), 'nothing was applied');

  // Compared with the policy as it is now, then applied.
  await page.getByRole('button', { name: 'Compare with the current policy' }).click();
  await checkState('valid');
  await page.locator('[data-testid=apply]').click();
  const applied = await page.locator('[data-testid=applied]').textContent();
  editedRevision = Number(/revision (\d+)/.exec(applied)[1]);
  assert.equal(editedRevision, other.body.revision + 1, applied);
  await until('the proxy to serve the edited route', async () => (await proxyGet('/')).body === CONSOLE_ANSWER);
});

test('3. rolled back from the history page after a confirmation: the proxy serves the old answer', async () => {
  const before = editedRevision - 1;
  await go('#/history');
  const edited = page.locator(`tr[data-revision="${editedRevision}"]`);
  assert.equal(await edited.locator('[data-testid=author]').textContent(), 'admin');

  // A diff between two revisions.
  await page.locator(`tr[data-revision="${before}"] input[name=from]`).check();
  await page.locator(`tr[data-revision="${editedRevision}"] input[name=to]`).check();
  await page.locator('[data-testid=diff] .line.add').filter({ hasText: CONSOLE_ANSWER }).waitFor();
  await shot('history');

  await page.locator(`tr[data-revision="${before}"] [data-testid=rollback]`).click();
  const dialog = page.locator('dialog[open]');
  // The confirmation says what would change before anything does.
  await dialog.locator('.line.add').filter({ hasText: 'backend: upstream' }).waitFor();
  assert.equal((await proxyGet('/')).body, CONSOLE_ANSWER, 'nothing changed before the confirmation');
  await dialog.locator('[data-testid=confirm]').click();
  await page.locator('[data-testid=rolled-back]').filter({ hasText: `Rolled back to revision ${before}` }).waitFor();
  await until('the proxy to serve the old answer', async () => (await proxyGet('/')).body.includes(DEMO_ANSWER));
  const rollback = page.locator(`tr[data-revision="${editedRevision + 1}"]`);
  await rollback.filter({ hasText: 'rollback' }).waitFor();
});

test("4. the backends page shows each endpoint's state as the proxies report it, live", async () => {
  await go('#/backends');
  const row = page.locator('tr[data-name="demo/upstream"]');
  const state = row.locator('[data-testid=endpoint-state]');
  // The quickstart's one endpoint, on the one proxy, without a health check.
  await until('the endpoint shown as reported by 1 proxy, not health checked', async () => {
    const shown = await state.allTextContents();
    return shown.length === 1 && shown[0] === 'not health checked (1 proxy)' && shown;
  });
  assert.equal(await state.getAttribute('data-proxies'), '1');
  const address = await state.getAttribute('data-address');
  assert.equal(await row.locator('li[data-address] > code').textContent(), address, 'the badge is on its endpoint');

  // Another operator adds a health check: the page follows, without a reload.
  const backend = await adminCall('/v1/backends/demo/upstream');
  assert.equal(backend.status, 200, JSON.stringify(backend.body));
  const checked = { ...backend.body, health_check: { interval: '1s', http: { path: '/' } } };
  const put = await adminCall('/v1/backends/demo/upstream', {
    method: 'PUT',
    body: JSON.stringify(checked),
    headers: { 'Content-Type': 'application/json' },
  });
  assert.equal(put.status, 200, JSON.stringify(put.body));
  await until('the endpoint shown healthy on 1 of 1 proxy', async () => (await state.textContent()) === 'healthy 1/1');
  assert.equal(await state.getAttribute('data-state'), 'good');
  assert.equal(await state.getAttribute('data-address'), address);
});

test('5. a chart moves while a client sends traffic', async () => {
  await go('#/overview');
  const chart = page.locator('[data-testid=chart-rps-demo]');
  // The namespace appears once it has had traffic; start sending now.
  let sending = true;
  const client = (async () => {
    const deadline = Date.now() + 3 * WAIT_MS;
    while (sending && Date.now() < deadline) {
      await Promise.all(Array.from({ length: 10 }, () => proxyGet('/').catch(() => null)));
    }
  })();
  try {
    await chart.waitFor({ timeout: 2 * WAIT_MS });
    const first = await chart.getAttribute('data-last-t');
    await until('the RPS chart to show traffic on a newer point', async () => {
      const last = await chart.getAttribute('data-last-t');
      const rps = Number((await chart.getAttribute('data-last')) || 0);
      return last !== first && rps > 0;
    });
    const shown = Number(await page.locator('[data-testid=traffic-demo] [data-testid=rps]').textContent());
    assert.ok(shown > 0, `req/s shown: ${shown}`);
    // Each y axis labels its ticks apart and in full: the latency axis once
    // read "0.0 ms" on every tick, "10.0 ms" and "20.0 ms" cut short.
    for (const kind of ['rps', 'errors', 'latency']) {
      const axis = page.locator(`[data-testid=chart-${kind}-demo]`);
      await until(`the ${kind} chart's y axis to be drawn`, async () => Boolean(await axis.getAttribute('data-y-ticks')));
      const labels = (await axis.getAttribute('data-y-ticks')).split('|');
      assert.ok(labels.length >= 2, `${kind}: ${labels}`);
      assert.equal(new Set(labels).size, labels.length, `${kind}: ticks labelled alike: ${labels}`);
      assert.equal(await axis.getAttribute('data-y-ticks-cut'), '0', `${kind}: labels cut off: ${labels}`);
    }
    const latency = (await page.locator('[data-testid=chart-latency-demo]').getAttribute('data-y-ticks')).split('|');
    assert.ok(latency.every((l) => /^\d+(\.\d+)? m?s$/.test(l)), `latency ticks: ${latency}`);
    const note = await page.locator('[data-testid=traffic] > p').first().textContent();
    assert.match(note, /rates over the last 10 s/, note);
  } finally {
    sending = false;
    await client;
  }
});

test('6. screenshots of the main pages', async () => {
  await go('#/overview');
  await page.locator('[data-testid=fleet-connected]').waitFor();
  await page.locator('[data-testid=traffic], [data-testid=traffic-unavailable]').first().waitFor();
  await shot('overview');
  await go('#/routes');
  await page.locator('tr[data-name="demo/root"]').waitFor();
  await shot('routes');
  await go('#/fleet');
  await page.locator('[data-testid=table-proxies] [data-testid=acked]').first().waitFor();
  await shot('fleet');
});

test('7. a viewer sees no edit, apply or rollback button, and a read-only editor', async () => {
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.locator('input[name=token]').waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem('prism.token')), null);
  await signIn(VIEWER_TOKEN);
  await page.locator('[data-testid=whoami]').filter({ hasText: 'viewer' }).waitFor();

  const editLike = 'button, a.button';
  for (const [hash, ready] of [
    ['#/namespaces', 'tr[data-name="demo"]'],
    ['#/backends', 'tr[data-name="demo/upstream"]'],
    ['#/routes', 'tr[data-name="demo/root"]'],
    ['#/bindings', 'tr[data-name="demo/kv"]'],
    ['#/history', 'tr[data-revision]'],
  ]) {
    await go(hash);
    await page.locator(ready).first().waitFor();
    assert.equal(await page.locator('[data-edit]').count(), 0, `${hash}: controls that change the policy`);
    const labels = await page.locator(editLike).allTextContents();
    const changing = labels.filter((l) => /edit|delete|apply|roll back/i.test(l));
    assert.deepEqual(changing, [], `${hash}: buttons`);
  }

  await go('#/edit?kind=routes&name=demo/root');
  const content = page.locator('.cm-content');
  await content.filter({ hasText: 'backend: upstream' }).waitFor();
  await page.locator('[data-testid=read-only]').waitFor();
  assert.equal(await content.getAttribute('contenteditable'), 'false');
  assert.equal(await page.locator('[data-testid=apply]').count(), 0);
  const text = await content.innerText();
  await content.click();
  await page.keyboard.type('typed by a viewer');
  assert.equal(await content.innerText(), text, 'the text did not change');
});
