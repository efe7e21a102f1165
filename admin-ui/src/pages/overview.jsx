// The overview: the revision, the fleet's health at a glance, what the
// policy holds, and live traffic per namespace (RPS, error rate, p50/p99).

import { get } from '../api.js';
import { Chart } from '../chart.jsx';
import { msTicks, percentTicks, rateTicks } from '../ticks.js';
import { formatMs, formatPercent, formatPeriod, formatRate, useTraffic } from '../traffic.js';
import { ErrorBox, Loading, ago, useInterval, useLoad } from '../ui.jsx';

async function loadOverview() {
  const [revision, fleet, ...lists] = await Promise.all([
    get('/v1/revision'),
    get('/v1/proxies'),
    get('/v1/namespaces'),
    get('/v1/backends'),
    get('/v1/routes'),
    get('/v1/bindings'),
    get('/v1/secrets'),
  ]);
  const [namespaces, backends, routes, bindings, secrets] = lists.map((l) => l.items.length);
  return { revision: revision.revision, proxies: fleet.proxies, counts: { namespaces, backends, routes, bindings, secrets } };
}

/** The fleet at a glance: connected, current, lagging, NACKing. */
export function fleetHealth(proxies, revision) {
  const connected = proxies.filter((p) => p.connected);
  return {
    total: proxies.length,
    connected: connected.length,
    current: connected.filter((p) => p.acked_revision === revision).length,
    lagging: connected.filter((p) => p.lag != null && p.lag > 0).length,
    nacked: connected.filter((p) => p.last_nack && p.last_nack.revision >= (p.acked_revision ?? 0)).length,
  };
}

const RPS = [{ label: 'req/s', value: (p) => p.rps, stroke: '#2a6fdb' }];
const ERRORS = [{ label: 'errors', value: (p) => p.error_rate, stroke: '#d33' }];
const LATENCY = [
  { label: 'p50', value: (p) => p.p50_ms, stroke: '#2a9d8f' },
  { label: 'p99', value: (p) => p.p99_ms, stroke: '#e76f51' },
];

function Traffic() {
  const { traffic, state, error } = useTraffic();
  if (state === 'unavailable') {
    return (
      <p class="muted" data-testid="traffic-unavailable">
        Live traffic is not available: this control plane does not serve <code>/v1/traffic</code>.
      </p>
    );
  }
  if (!traffic) return <Loading what="live traffic" />;
  return (
    <div data-testid="traffic" data-state={state}>
      <p class="muted">
        {state === 'live' ? 'Live' : state === 'polling' ? 'Polling (the live stream is reconnecting)' : 'Connecting'}; rates over
        the last {formatPeriod(traffic.summary_seconds)}, charts over {formatPeriod(traffic.window_seconds)}; updated{' '}
        {ago(traffic.updated_unix_ms)}.
        {error ? <span class="warn"> {error}</span> : null}
      </p>
      {traffic.namespaces.length === 0 ? <p class="muted">No traffic yet.</p> : null}
      {traffic.namespaces.map((ns) => (
        <article class="card traffic" data-testid={`traffic-${ns.namespace}`}>
          <header>
            <h3>{ns.namespace}</h3>
            <dl class="numbers">
              <dt>req/s</dt>
              <dd data-testid="rps">{formatRate(ns.rps)}</dd>
              <dt>errors</dt>
              <dd>{formatPercent(ns.error_rate)}</dd>
              <dt>p50</dt>
              <dd>{formatMs(ns.p50_ms)}</dd>
              <dt>p99</dt>
              <dd>{formatMs(ns.p99_ms)}</dd>
              <dt>requests</dt>
              <dd>{ns.requests}</dd>
            </dl>
          </header>
          <div class="charts">
            <Chart title="Requests per second" series={ns.series} lines={RPS} format={formatRate} ticks={rateTicks} testId={`chart-rps-${ns.namespace}`} />
            <Chart title="Error rate" series={ns.series} lines={ERRORS} format={formatPercent} ticks={percentTicks} floor={0.01} testId={`chart-errors-${ns.namespace}`} />
            <Chart title="Latency p50 / p99" series={ns.series} lines={LATENCY} format={formatMs} ticks={msTicks} floor={0.1} testId={`chart-latency-${ns.namespace}`} />
          </div>
        </article>
      ))}
    </div>
  );
}

export function OverviewPage() {
  const { data, error, refresh } = useLoad(loadOverview);
  useInterval(refresh, 5000);
  const health = data ? fleetHealth(data.proxies, data.revision) : null;
  return (
    <section>
      <header class="page-head">
        <h2>Overview</h2>
      </header>
      <ErrorBox error={error} />
      {!data && !error ? <Loading what="the overview" /> : null}
      {data ? (
        <div class="tiles">
          <a class="tile" href="#/history">
            <span class="label">revision</span>
            <span class="value" data-testid="revision">{data.revision}</span>
          </a>
          <a class="tile" href="#/fleet">
            <span class="label">proxies connected</span>
            <span class="value" data-testid="fleet-connected">
              {health.connected} / {health.total}
            </span>
            <span class={health.current === health.connected ? 'good' : 'warn'}>
              {health.current} at the current revision
            </span>
            {health.lagging ? <span class="warn">{health.lagging} lagging</span> : null}
            {health.nacked ? <span class="bad">{health.nacked} rejected a push</span> : null}
          </a>
          {Object.entries(data.counts).map(([plural, count]) => (
            <a class="tile" href={`#/${plural}`}>
              <span class="label">{plural}</span>
              <span class="value">{count}</span>
            </a>
          ))}
        </div>
      ) : null}
      <h2>Traffic per namespace</h2>
      <Traffic />
    </section>
  );
}
