// Unit tests of the console's pure parts, under Node: the event-stream
// parser that reads the traffic stream, the mapping from an error's field
// path to the text of a policy document, the charts' tick labels and an
// endpoint's state badge. `npm test` runs them, and so does tests/console.rs
// with the browser tests.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { endpointState } from '../src/endpoints.js';
import { eventParser } from '../src/sse.js';
import { msTicks, percentTicks, rateTicks, stepDecimals } from '../src/ticks.js';
import { locateError, locateField, parseFieldPath } from '../src/yamlpath.js';

/** Every event `chunks` make, as `[type, data]`. */
function events(chunks) {
  const seen = [];
  const feed = eventParser((type, data) => seen.push([type, data]));
  for (const chunk of chunks) feed(chunk);
  return seen;
}

const STREAM =
  ': keep-alive\n\n' +
  'event: traffic\ndata: {"a":1}\n\n' +
  'event: traffic\r\ndata: {"b":\r\ndata: 2}\r\n\r\n' +
  'data:plain\n\n' +
  'event: traffic\ndata: {"c":3}\n';

const EXPECTED = [
  ['traffic', '{"a":1}'],
  ['traffic', '{"b":\n2}'],
  ['message', 'plain'],
];

test('the stream parser reads events, whatever the chunks', () => {
  assert.deepEqual(events([STREAM]), EXPECTED, 'one chunk');
  assert.deepEqual(events([...STREAM]), EXPECTED, 'a character at a time');
  for (let cut = 0; cut <= STREAM.length; cut++) {
    assert.deepEqual(events([STREAM.slice(0, cut), STREAM.slice(cut)]), EXPECTED, `cut at ${cut}`);
  }
  // The last event ends only with its blank line.
  assert.deepEqual(events([STREAM, '\n']).at(-1), ['traffic', '{"c":3}']);
});

test('field paths split into names and indexes', () => {
  assert.deepEqual(parseFieldPath('routes[0].match.headers[12].regex'), ['routes', 0, 'match', 'headers', 12, 'regex']);
  assert.deepEqual(parseFieldPath(''), []);
});

const DOCUMENT = `# a comment
namespaces:
  - name: demo
    hosts: [demo.local]
routes:
  - name: demo/one
    match: { prefix: /one }
    backend: web
  - name: demo/root
    match:
      prefix: /
    directResponse:
      status: 99
    backend: gone
`;

/** The text an error's range covers. */
function marked(field, resource) {
  const { from, to, exact } = locateField(DOCUMENT, field, resource);
  return [DOCUMENT.slice(from, to), exact];
}

test('an error field is found in the document, in either spelling', () => {
  assert.deepEqual(marked('routes[1].direct_response.status'), ['status: 99', true]);
  assert.deepEqual(marked('routes[0].match.prefix'), ['prefix: /one', true]);
  assert.deepEqual(marked('namespaces[0].hosts[0]'), ['demo.local', true]);
  // A block: its key only.
  assert.deepEqual(marked('routes[1].match'), ['match', true]);
});

test('a missing field points at the nearest part that is there', () => {
  assert.deepEqual(marked('routes[1].timeout'), ['name: demo/root', false]);
  assert.deepEqual(marked('routes[0].match.headers[0].name'), ['match', false]);
});

test('a rule across resources is found by the resource it names', () => {
  assert.deepEqual(marked('backend', 'Route demo/root'), ['backend: gone', true]);
  assert.deepEqual(marked('hosts', 'Namespace demo'), ['hosts', true]);
});

test('a syntax error is found by its line and column', () => {
  const { from } = locateError(DOCUMENT, { message: 'did not find expected key at line 6 column 5' });
  assert.equal(DOCUMENT.slice(from, from + 4), 'name');
});

test('y-axis ticks: as many decimals as their step needs, never one label twice', () => {
  assert.deepEqual([10, 0.5, 0.25, 0.05, 0.025, 200].map(stepDecimals), [0, 1, 2, 2, 3, 0]);
  // The latency chart with p99 at ~24 ms once read "0.0 ms" three times.
  assert.deepEqual(msTicks([0, 10, 20], 10), ['0 ms', '10 ms', '20 ms']);
  assert.deepEqual(msTicks([0, 0.05, 0.1], 0.05), ['0 ms', '0.05 ms', '0.1 ms']);
  assert.deepEqual(msTicks([0, 0.025, 0.05, 0.075], 0.025), ['0 ms', '0.025 ms', '0.05 ms', '0.075 ms']);
  assert.deepEqual(msTicks([0, 200, 400, 600], 200), ['0 ms', '200 ms', '400 ms', '600 ms']);
  assert.deepEqual(msTicks([0, 500, 1000, 1500], 500), ['0 s', '0.5 s', '1 s', '1.5 s']);
  assert.deepEqual(msTicks([0, 2000, 4000], 2000), ['0 s', '2 s', '4 s']);
  assert.deepEqual(rateTicks([0, 100, 200], 100), ['0', '100', '200']);
  assert.deepEqual(rateTicks([0, 0.5, 1], 0.5), ['0', '0.5', '1']);
  assert.deepEqual(percentTicks([0, 0.005, 0.01], 0.005), ['0%', '0.5%', '1%']);
  assert.deepEqual(percentTicks([0, 0.0025, 0.005], 0.0025), ['0%', '0.25%', '0.5%']);
  assert.deepEqual(percentTicks([0, 0.5, 1], 0.5), ['0%', '50%', '100%']);
  for (let top = 0.1; top < 20000; top *= 1.7) {
    for (const step of [1, 2, 2.5, 5].map((m) => m * 10 ** Math.floor(Math.log10(top / 3)))) {
      const ticks = Array.from({ length: Math.floor(top / step) + 1 }, (_, i) => Math.round(i * step * 1e9) / 1e9);
      const labels = msTicks(ticks, step);
      assert.equal(new Set(labels).size, labels.length, `${labels}`);
    }
  }
});

test("an endpoint's state: one line and a level from the proxies' counts", () => {
  const seen = (health) => {
    const { level, text } = endpointState(health);
    return [level, text];
  };
  const zero = { proxies: 2, healthy: 0, unhealthy: 0, breaker_open: 0, breaker_half_open: 0, ejected: 0 };
  assert.deepEqual(seen(null), ['none', 'no proxy reports it']);
  assert.deepEqual(seen({ ...zero, proxies: 0 }), ['none', 'no proxy reports it']);
  assert.deepEqual(seen(zero), ['plain', 'not health checked (2 proxies)']);
  assert.deepEqual(seen({ ...zero, proxies: 1 }), ['plain', 'not health checked (1 proxy)']);
  assert.deepEqual(seen({ ...zero, healthy: 2 }), ['good', 'healthy 2/2']);
  assert.deepEqual(seen({ ...zero, healthy: 1, unhealthy: 1 }), ['warn', 'unhealthy on 1 of 2 proxies']);
  assert.deepEqual(seen({ ...zero, unhealthy: 2 }), ['bad', 'unhealthy on 2 of 2 proxies']);
  assert.deepEqual(seen({ ...zero, healthy: 2, breaker_open: 1 }), ['warn', 'healthy 2/2 · breaker open on 1']);
  assert.deepEqual(seen({ ...zero, breaker_half_open: 1 }), ['warn', 'not health checked (2 proxies) · breaker half-open on 1']);
  assert.deepEqual(seen({ ...zero, ejected: 2 }), ['bad', 'not health checked (2 proxies) · ejected on 2']);
  assert.match(endpointState({ ...zero, healthy: 2 }, 'the last 10 s').title, /^2 proxies report this endpoint \(the last 10 s\): 2 healthy, 0 unhealthy/);
});
