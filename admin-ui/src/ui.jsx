// Small shared pieces: loading data, errors, the unified-diff view,
// timestamps, confirmation dialogs.

import { useCallback, useEffect, useRef, useState } from 'preact/hooks';

/**
 * Runs `load()` now and whenever `deps` change, and again on `refresh()`.
 * Returns `{data, error, loading, refresh}`.
 */
export function useLoad(load, deps = []) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ ...s, loading: true }));
    load().then(
      (data) => live && setState({ data, error: null, loading: false }),
      (error) => live && setState({ data: null, error, loading: false }),
    );
    return () => {
      live = false;
    };
  }, [...deps, tick]);
  const refresh = useCallback(() => setTick((t) => t + 1), []);
  return { ...state, refresh };
}

/** Calls `fn` every `ms` while mounted. */
export function useInterval(fn, ms) {
  const saved = useRef(fn);
  saved.current = fn;
  useEffect(() => {
    const id = setInterval(() => saved.current(), ms);
    return () => clearInterval(id);
  }, [ms]);
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return (
    <div class="error" role="alert">
      {error.status ? <strong>{error.status} {error.code} </strong> : null}
      {error.message}
      {error.field ? <span class="field"> (at {error.field})</span> : null}
    </div>
  );
}

export function Loading({ what }) {
  return <p class="muted">Loading {what}…</p>;
}

/** A unified diff as the API writes it, each line coloured by its sign. */
export function DiffText({ text }) {
  const lines = (text || '').replace(/\n$/, '').split('\n');
  return (
    <pre class="diff">
      {lines.map((line) => {
        const kind = line.startsWith('+++') || line.startsWith('---')
          ? 'head'
          : line.startsWith('@@')
            ? 'hunk'
            : line.startsWith('+')
              ? 'add'
              : line.startsWith('-')
                ? 'del'
                : line.startsWith('#')
                  ? 'note'
                  : 'ctx';
        return <span class={`line ${kind}`}>{line + '\n'}</span>;
      })}
    </pre>
  );
}

/** Each change of an apply, dry run, diff or rollback answer, with its diff. */
export function Changes({ changes, empty = 'No changes.' }) {
  if (!changes || changes.length === 0) return <p class="muted" data-testid="no-changes">{empty}</p>;
  return (
    <div class="changes" data-testid="changes">
      {changes.map((change) => (
        <details open class="change">
          <summary>
            <span class={`op op-${change.op}`}>{change.op}</span> {change.kind} <code>{change.name}</code>
          </summary>
          {change.diff ? <DiffText text={change.diff} /> : null}
        </details>
      ))}
    </div>
  );
}

export function formatTime(unixMillis) {
  if (unixMillis == null || unixMillis === '') return '–';
  const date = new Date(Number(unixMillis));
  return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
}

export function ago(unixMillis) {
  if (!unixMillis) return '–';
  const seconds = Math.round((Date.now() - Number(unixMillis)) / 1000);
  if (seconds < 60) return `${Math.max(0, seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

/**
 * A modal confirmation (<dialog>): `open` shows it; `onConfirm` and
 * `onCancel` close it. The confirm button can be busy while its call runs.
 */
export function Confirm({ open, title, children, confirmLabel, busy, onConfirm, onCancel, danger }) {
  const dialog = useRef(null);
  useEffect(() => {
    const element = dialog.current;
    if (open && !element.open) element.showModal();
    if (!open && element.open) element.close();
  }, [open]);
  return (
    <dialog ref={dialog} class="confirm" onCancel={(e) => { e.preventDefault(); onCancel(); }}>
      <h3>{title}</h3>
      <div class="body">{open ? children : null}</div>
      <div class="actions">
        <button type="button" onClick={onCancel} disabled={busy}>Cancel</button>
        <button type="button" class={danger ? 'danger' : 'primary'} onClick={onConfirm} disabled={busy} data-testid="confirm">
          {busy ? 'Working…' : confirmLabel}
        </button>
      </div>
    </dialog>
  );
}

/** A compact `key: value` summary of a plain object, for table cells. */
export function summary(value) {
  if (value == null) return '';
  if (typeof value !== 'object') return String(value);
  if (Array.isArray(value)) return value.map(summary).join(', ');
  return Object.entries(value)
    .map(([k, v]) => (v !== null && typeof v === 'object' ? `${k} {${summary(v)}}` : `${k}: ${v}`))
    .join(', ');
}
