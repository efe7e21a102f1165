// The resource pages: namespaces, backends, routes, data bindings and
// secrets, one table each, with live traffic where the traffic API counts
// it (namespaces, routes, backends) and, on backends, each endpoint's state
// as the proxies report it (health, breaker, ejection). Editors get Edit and
// Delete on each row; viewers see neither.

import { useState } from 'preact/hooks';
import { stringify } from 'yaml';
import { api, get } from '../api.js';
import { endpointState } from '../endpoints.js';
import { nameFirst } from '../kinds.js';
import { formatMs, formatPercent, formatPeriod, formatRate, indexBy, useTraffic } from '../traffic.js';
import { Confirm, ErrorBox, Loading, summary, useLoad } from '../ui.jsx';

const DAY_MS = 86400000;

function Hosts({ hosts }) {
  return (hosts || []).map((h) => <code class="chip">{h}</code>);
}

function Live({ row, period }) {
  if (!row) return <span class="muted">–</span>;
  return (
    <span class="live" title={`${row.requests} requests, ${row.errors} errors in the last ${period}`}>
      {formatRate(row.rps)}/s · {formatPercent(row.error_rate)} err · p99 {formatMs(row.p99_ms)}
    </span>
  );
}

/** A header or query condition: `x-env=prod`, `x-v~2.*`, `x-debug absent`. */
function condition(c) {
  if (c.exact != null) return `${c.name}=${c.exact}`;
  if (c.regex != null) return `${c.name}~${c.regex}`;
  if (c.present) return `${c.name} present`;
  if (c.absent) return `${c.name} absent`;
  return summary(c);
}

/** A route's match as one line: host, path rule, methods, headers, query. */
function matchText(match = {}) {
  const parts = [];
  if (match.host) parts.push(`host ${match.host}`);
  if (match.exact != null) parts.push(`= ${match.exact}`);
  if (match.prefix != null) parts.push(`${match.prefix}*`);
  if (match.regex != null) parts.push(`~ ${match.regex}`);
  if (match.methods && match.methods.length) parts.push(match.methods.join('|'));
  for (const h of match.headers || []) parts.push(`header ${condition(h)}`);
  for (const q of match.query_params || []) parts.push(`query ${condition(q)}`);
  return parts.join(' ');
}

/** A route's action: one backend, a weighted split, a redirect or a direct answer. */
function actionText(route) {
  if (route.backend) return `→ ${route.backend}`;
  if (route.backends) return `→ ${route.backends.map((b) => `${b.name} ${b.weight ?? 1}`).join(', ')}`;
  if (route.redirect) return `redirect ${summary(route.redirect)}`;
  if (route.direct_response) {
    const { status, body } = route.direct_response;
    return `answer ${status}${body ? `: ${body.length > 40 ? `${body.slice(0, 40)}…` : body}` : ''}`;
  }
  return '';
}

function expiry(notAfter) {
  if (!notAfter) return <span class="muted">unknown</span>;
  const left = new Date(notAfter).getTime() - Date.now();
  const days = Math.floor(left / DAY_MS);
  const cls = left < 0 ? 'bad' : days < 30 ? 'warn' : '';
  return (
    <span class={cls}>
      {notAfter} ({left < 0 ? 'expired' : `in ${days} d`})
    </span>
  );
}

/** One endpoint's live state as a badge; nothing while there is no traffic feed. */
function EndpointState({ address, health, live }) {
  if (!live) return null;
  const { level, text, title } = endpointState(health, `the last ${live.period}`);
  return (
    <span class={`badge ${level}`} title={title} data-testid="endpoint-state" data-address={address} data-state={level} data-proxies={health ? health.proxies : 0}>
      {text}
    </span>
  );
}

/**
 * A backend's endpoints as configured, each with its state as the proxies
 * report it; then any endpoint the proxies report that the policy does not
 * hold (a change on its way).
 */
function Endpoints({ backend, live }) {
  const reported = indexBy(live && live.row ? live.row.endpoints : [], (e) => e.address);
  const configured = backend.endpoints || [];
  const extra = [...reported.values()].filter((e) => !configured.some((c) => c.address === e.address));
  return (
    <ul class="plain endpoints">
      {configured.map((e) => (
        <li data-address={e.address}>
          <code>{e.address}</code>
          {e.zone ? ` zone ${e.zone}` : ''}
          {e.weight ? ` weight ${e.weight}` : ''} <EndpointState address={e.address} health={reported.get(e.address)} live={live} />
        </li>
      ))}
      {extra.map((e) => (
        <li data-address={e.address}>
          <code>{e.address}</code> <span class="muted">not in the policy</span>{' '}
          <EndpointState address={e.address} health={e} live={live} />
        </li>
      ))}
    </ul>
  );
}

/**
 * Columns of each kind: `[title, cell(resource, live)]`; `live` is
 * `{row, period}` (the resource's row of the traffic API, if any) once the
 * traffic feed has answered, else null.
 */
const COLUMNS = {
  namespaces: [
    ['hosts', (r) => <Hosts hosts={r.hosts} />],
    ['default timeout', (r) => r.default_timeout || ''],
    ['rate limits', (r) => summary(r.rate_limits)],
    ['TLS', (r) => [r.tls_secret, r.client_ca_secret && `client CA ${r.client_ca_secret}`].filter(Boolean).join(', ')],
    ['labels', (r) => summary(r.labels)],
  ],
  backends: [
    ['protocol', (r) => [r.protocol || 'HTTP1', r.lb_policy || 'ROUND_ROBIN'].join(' · ')],
    ['endpoints', (r, live) => <Endpoints backend={r} live={live} />],
    [
      'health check',
      (r) => (r.health_check ? summary(r.health_check) : <span class="muted">none (endpoints always in)</span>),
    ],
    [
      'circuit breaker · outlier detection',
      (r) =>
        [r.circuit_breaker && `breaker {${summary(r.circuit_breaker)}}`, r.outlier_detection && `outlier {${summary(r.outlier_detection)}}`]
          .filter(Boolean)
          .join(' ') || <span class="muted">none</span>,
    ],
  ],
  routes: [
    ['match', (r) => <code>{matchText(r.match)}</code>],
    ['action', (r) => actionText(r)],
    ['timeout · retry', (r) => [r.timeout, r.retry && `retry {${summary(r.retry)}}`].filter(Boolean).join(' · ')],
  ],
  bindings: [
    [
      'store',
      (r) => {
        const store = ['sqlite', 'postgres', 'memory', 'nats', 'kafka'].find((k) => r[k] != null);
        return store ? `${store} ${summary(r[store])}` : '';
      },
    ],
    [
      'settings',
      (r) =>
        summary(
          Object.fromEntries(
            Object.entries(r).filter(([k]) => !['name', 'sqlite', 'postgres', 'memory', 'nats', 'kafka'].includes(k)),
          ),
        ),
    ],
  ],
  secrets: [
    ['kind', (r) => r.kind],
    ['subject', (r) => r.subject || ''],
    ['names', (r) => (r.subject_alt_names || []).join(', ')],
    ['expires', (r) => (r.kind === 'credential' ? <span class="muted">–</span> : expiry(r.not_after))],
    ['certificates', (r) => r.certificates ?? ''],
  ],
};

/** Where the traffic API counts a kind's rows, and by what key. */
const LIVE = {
  namespaces: ['namespaces', (t) => t.namespace, (r) => r.name],
  backends: ['backends', (t) => `${t.namespace}/${t.backend}`, (r) => r.name],
  routes: ['routes', (t) => `${t.namespace}/${t.route}`, (r) => r.name],
};

const NOTES = {
  backends:
    'Each endpoint shows its state as the proxies that reported it lately see it: ' +
    'health check verdict, circuit breaker, outlier ejection.',
  secrets: 'Only names, kinds and expiry are shown: key material never leaves the control plane through this API.',
};

export function ResourcePage({ plural, title, me }) {
  const canEdit = me.role !== 'viewer' && plural !== 'secrets';
  const { data, error, refresh } = useLoad(() => get(`/v1/${plural}`), [plural]);
  const live = LIVE[plural];
  const { traffic } = useTraffic(Boolean(live));
  const counted = live && traffic ? indexBy(traffic[live[0]], live[1]) : null;
  const [deleting, setDeleting] = useState(null);

  return (
    <section>
      <header class="page-head">
        <h2>{title}</h2>
        <div class="tools">
          {data ? <span class="muted">revision {data.revision}</span> : null}
          {canEdit ? (
            <a class="button" href="#/edit" data-edit>
              Edit whole policy
            </a>
          ) : null}
        </div>
      </header>
      {NOTES[plural] ? <p class="muted note">{NOTES[plural]}</p> : null}
      <ErrorBox error={error} />
      {!data && !error ? <Loading what={title.toLowerCase()} /> : null}
      {data && data.items.length === 0 ? <p class="muted">None.</p> : null}
      {data && data.items.length > 0 ? (
        <table class="resources" data-testid={`table-${plural}`}>
          <thead>
            <tr>
              <th>name</th>
              {COLUMNS[plural].map(([heading]) => (
                <th>{heading}</th>
              ))}
              {live ? <th>{traffic ? `last ${formatPeriod(traffic.summary_seconds)}` : 'live'}</th> : null}
              {canEdit ? <th /> : null}
            </tr>
          </thead>
          <tbody>
            {data.items.map((resource) => (
              <tr data-name={resource.name}>
                <td>
                  <code>{resource.name}</code>
                </td>
                {COLUMNS[plural].map(([, cell]) => (
                  <td>{cell(resource, counted ? { row: counted.get(live[2](resource)), period: formatPeriod(traffic.summary_seconds) } : null)}</td>
                ))}
                {live ? (
                  <td>{counted ? <Live row={counted.get(live[2](resource))} period={formatPeriod(traffic.summary_seconds)} /> : <span class="muted">–</span>}</td>
                ) : null}
                {canEdit ? (
                  <td class="row-actions">
                    <a class="button" href={`#/edit?kind=${plural}&name=${encodeURIComponent(resource.name)}`} data-edit>
                      Edit
                    </a>
                    <button type="button" class="danger" onClick={() => setDeleting(resource.name)} data-edit>
                      Delete
                    </button>
                  </td>
                ) : null}
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
      {canEdit ? (
        <DeleteDialog
          plural={plural}
          name={deleting}
          onDone={() => {
            setDeleting(null);
            refresh();
          }}
          onCancel={() => setDeleting(null)}
        />
      ) : null}
    </section>
  );
}

/** Deletes one resource after a confirmation, on the version shown. */
function DeleteDialog({ plural, name, onDone, onCancel }) {
  const { data } = useLoad(() => (name ? api(`/v1/${plural}/${name}`) : Promise.resolve(null)), [plural, name]);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  async function confirm() {
    setBusy(true);
    setError(null);
    try {
      // If-Match: the version shown in the dialog, and no other.
      await api(`/v1/${plural}/${name}`, { method: 'DELETE', headers: data ? { 'If-Match': data.etag } : {} });
      onDone();
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  }
  return (
    <Confirm
      open={name != null}
      title={`Delete ${name}?`}
      confirmLabel="Delete"
      danger
      busy={busy}
      onConfirm={confirm}
      onCancel={() => {
        setError(null);
        onCancel();
      }}
    >
      <p>This writes a new revision without it. It can be undone by a rollback from the history.</p>
      {data ? <pre class="yaml">{stringify(nameFirst(data.data), { lineWidth: 0 })}</pre> : null}
      <ErrorBox error={error} />
    </Confirm>
  );
}
