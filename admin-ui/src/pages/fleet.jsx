// The fleet: every proxy the control plane knows, which revision it runs,
// how far behind it is, its last NACK; and which proxy is nearest a zone.

import { useState } from 'preact/hooks';
import { api, get } from '../api.js';
import { formatRate, indexBy, useTraffic } from '../traffic.js';
import { ErrorBox, Loading, ago, formatTime, useInterval, useLoad } from '../ui.jsx';

function Nearest() {
  const [zone, setZone] = useState('');
  const [region, setRegion] = useState('');
  const [answer, setAnswer] = useState(null);
  const [error, setError] = useState(null);
  async function ask(event) {
    event.preventDefault();
    setError(null);
    setAnswer(null);
    try {
      const query = new URLSearchParams({ zone, region });
      setAnswer((await api(`/v1/proxies/nearest?${query}`)).data);
    } catch (e) {
      setError(e);
    }
  }
  return (
    <form class="inline" onSubmit={ask}>
      <h3>Nearest proxy</h3>
      <label>
        zone <input value={zone} onInput={(e) => setZone(e.currentTarget.value)} placeholder="eu-west-1a" />
      </label>
      <label>
        region <input value={region} onInput={(e) => setRegion(e.currentTarget.value)} placeholder="eu-west-1" />
      </label>
      <button type="submit">Find</button>
      {answer ? (
        <span data-testid="nearest">
          {' '}
          <code>{answer.proxy.id}</code> at <code>{answer.address}</code> (same {answer.match})
        </span>
      ) : null}
      <ErrorBox error={error} />
    </form>
  );
}

export function FleetPage() {
  const { data, error, refresh } = useLoad(() => get('/v1/proxies'));
  useInterval(refresh, 3000);
  const { traffic } = useTraffic();
  const load = traffic ? indexBy(traffic.proxies, (p) => p.node) : null;
  return (
    <section>
      <header class="page-head">
        <h2>Fleet</h2>
        <div class="tools">{data ? <span class="muted">policy at revision {data.revision}</span> : null}</div>
      </header>
      <ErrorBox error={error} />
      {!data && !error ? <Loading what="the fleet" /> : null}
      {data && data.proxies.length === 0 ? <p class="muted">No proxy has connected yet.</p> : null}
      {data && data.proxies.length > 0 ? (
        <table class="resources" data-testid="table-proxies">
          <thead>
            <tr>
              <th>proxy</th>
              <th>zone · region</th>
              <th>address</th>
              <th>state</th>
              <th>revision</th>
              <th>lag</th>
              <th>last NACK</th>
              <th>req/s</th>
            </tr>
          </thead>
          <tbody>
            {data.proxies.map((p) => (
              <tr data-name={p.id}>
                <td>
                  <code>{p.id}</code>
                </td>
                <td>{[p.zone, p.region].filter(Boolean).join(' · ') || <span class="muted">none</span>}</td>
                <td>
                  <code>{p.address}</code>
                </td>
                <td>
                  {p.connected ? (
                    <span class="good" title={`connected since ${formatTime(p.connected_since_unix_millis)}`}>
                      connected
                    </span>
                  ) : (
                    <span class="bad">gone</span>
                  )}
                  <div class="muted small">seen {ago(p.last_seen_unix_millis)}</div>
                </td>
                <td data-testid="acked">{p.acked_revision ?? <span class="muted">none yet</span>}</td>
                <td class={p.lag ? 'warn' : ''}>{p.lag ?? '–'}</td>
                <td>
                  {p.last_nack ? (
                    <span class="bad" title={p.last_nack.type_url}>
                      r{p.last_nack.revision} {formatTime(p.last_nack.unix_millis)}: {p.last_nack.message}
                    </span>
                  ) : (
                    <span class="muted">none</span>
                  )}
                </td>
                <td>{load && load.get(p.id) ? formatRate(load.get(p.id).rps) : '–'}</td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
      <Nearest />
    </section>
  );
}
