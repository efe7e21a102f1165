// The history: every revision with its author, a diff between any two
// (`GET /v1/diff`), and rollback to any one after a confirmation that shows
// what it would change (a dry run first, then the rollback with `If-Match`
// on the revision the dry run was worked out against).

import { useState } from 'preact/hooks';
import { api, get } from '../api.js';
import { Changes, Confirm, ErrorBox, Loading, formatTime, useLoad } from '../ui.jsx';

function changeSummary(changes = []) {
  const shown = changes.slice(0, 4).map((c) => `${c.op === 'DELETE' ? '−' : '+'} ${c.kind} ${c.name}`);
  if (changes.length > 4) shown.push(`and ${changes.length - 4} more`);
  return shown.join(', ');
}

function DiffView({ from, to }) {
  const { data, error } = useLoad(() => get(`/v1/diff?from=${from}&to=${to}`), [from, to]);
  return (
    <div class="card" data-testid="diff">
      <h3>
        Diff from revision {from} to {to}
      </h3>
      <ErrorBox error={error} />
      {data ? <Changes changes={data.changes} empty="The two revisions hold the same policy." /> : !error ? <Loading what="the diff" /> : null}
    </div>
  );
}

function RollbackDialog({ to, onDone, onCancel }) {
  // The dry run: what the rollback would change, and the ETag it was worked
  // out against, which the rollback then sends as If-Match.
  const preview = useLoad(
    () => (to == null ? Promise.resolve(null) : api(`/v1/rollback?to=${to}&dry_run=true`, { method: 'POST' })),
    [to],
  );
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  async function confirm() {
    setBusy(true);
    setError(null);
    try {
      const { data } = await api(`/v1/rollback?to=${to}`, {
        method: 'POST',
        headers: { 'If-Match': preview.data.etag },
      });
      onDone(data);
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  }
  const unchanged = preview.data && preview.data.data.unchanged;
  return (
    <Confirm
      open={to != null}
      title={`Roll back to revision ${to}?`}
      confirmLabel={`Roll back to ${to}`}
      danger
      busy={busy || !preview.data || unchanged}
      onConfirm={confirm}
      onCancel={() => {
        setError(null);
        onCancel();
      }}
    >
      <p>
        This writes one new revision whose policy equals revision {to}'s. It is validated like every write, and can
        itself be rolled back.
      </p>
      <ErrorBox error={preview.error} />
      {preview.data ? (
        unchanged ? (
          <p class="muted">The policy already equals revision {to}'s: there is nothing to roll back.</p>
        ) : (
          <>
            <p>It would change, against revision {preview.data.data.revision}:</p>
            <Changes changes={preview.data.data.changes} />
          </>
        )
      ) : !preview.error ? (
        <Loading what="what the rollback would change" />
      ) : null}
      <ErrorBox error={error} />
    </Confirm>
  );
}

export function HistoryPage({ me }) {
  // A rollback sets the whole policy: only editors of every namespace may.
  const canRollBack = me.role !== 'viewer' && me.namespaces.length === 0;
  const [filter, setFilter] = useState({ namespace: '', author: '' });
  const { data, error, refresh } = useLoad(() => {
    const query = new URLSearchParams({ limit: '200' });
    if (filter.namespace) query.set('namespace', filter.namespace);
    if (filter.author) query.set('author', filter.author);
    return get(`/v1/history?${query}`);
  }, [filter.namespace, filter.author]);
  const [from, setFrom] = useState(null);
  const [to, setTo] = useState(null);
  const [rollingBack, setRollingBack] = useState(null);
  const [done, setDone] = useState(null);

  const current = data ? data.revision : null;
  const diffTo = to ?? current;
  return (
    <section>
      <header class="page-head">
        <h2>History</h2>
        <form
          class="tools"
          onSubmit={(e) => {
            e.preventDefault();
            const form = new FormData(e.currentTarget);
            setFilter({ namespace: form.get('namespace').trim(), author: form.get('author').trim() });
          }}
        >
          <input name="namespace" placeholder="namespace" aria-label="only this namespace" />
          <input name="author" placeholder="author" aria-label="only this author" />
          <button type="submit">Filter</button>
        </form>
      </header>
      {done ? (
        <div class="ok" role="status" data-testid="rolled-back">
          {done.unchanged
            ? `The policy already equalled revision ${done.to}'s.`
            : `Rolled back to revision ${done.to} as revision ${done.revision}: ${done.changes.length} change(s).`}
        </div>
      ) : null}
      <p class="muted">Pick two revisions to compare (“from” and “to”; “to” is the current one unless picked).</p>
      <ErrorBox error={error} />
      {!data && !error ? <Loading what="the history" /> : null}
      {data ? (
        <table class="resources history" data-testid="table-history">
          <thead>
            <tr>
              <th>revision</th>
              <th>when</th>
              <th>author</th>
              <th>action</th>
              <th>changes</th>
              <th>compare</th>
              {canRollBack ? <th /> : null}
            </tr>
          </thead>
          <tbody>
            {data.items.map((entry) => {
              const revision = Number(entry.revision);
              return (
                <tr data-revision={revision} class={revision === current ? 'current' : ''}>
                  <td>
                    <strong>{revision}</strong>
                    {revision === current ? <span class="muted"> current</span> : null}
                  </td>
                  <td>{formatTime(entry.unix_millis)}</td>
                  <td data-testid="author">{entry.actor}</td>
                  <td>{entry.action}</td>
                  <td class="small">{changeSummary(entry.changes)}</td>
                  <td class="compare">
                    <label>
                      <input type="radio" name="from" checked={from === revision} onChange={() => setFrom(revision)} /> from
                    </label>
                    <label>
                      <input type="radio" name="to" checked={to === revision} onChange={() => setTo(revision)} /> to
                    </label>
                  </td>
                  {canRollBack ? (
                    <td>
                      {revision !== current ? (
                        <button type="button" data-edit data-testid="rollback" onClick={() => setRollingBack(revision)}>
                          Roll back to {revision}
                        </button>
                      ) : null}
                    </td>
                  ) : null}
                </tr>
              );
            })}
          </tbody>
        </table>
      ) : null}
      {from != null && diffTo != null ? <DiffView from={from} to={diffTo} /> : null}
      {canRollBack ? (
        <RollbackDialog
          to={rollingBack}
          onCancel={() => setRollingBack(null)}
          onDone={(answer) => {
            setRollingBack(null);
            setDone(answer);
            refresh();
          }}
        />
      ) : null}
    </section>
  );
}
