// The policy editor: a CodeMirror 6 YAML editor over one resource or the
// whole policy. As the operator types, the document is sent to the server
// as a dry run (`POST /v1/apply?dry_run=true`, debounced by the linter):
// a refusal is drawn on the field it names, an accepted document shows the
// diff it would make. Apply sends `If-Match` with the policy's ETag as it
// was when the document was loaded, so a change made meanwhile by someone
// else is a visible 412, never silently overwritten.

import { useEffect, useRef, useState } from 'preact/hooks';
import { EditorState } from '@codemirror/state';
import {
  EditorView,
  drawSelection,
  highlightActiveLine,
  highlightActiveLineGutter,
  keymap,
  lineNumbers,
} from '@codemirror/view';
import { defaultKeymap, history, historyKeymap, indentWithTab } from '@codemirror/commands';
import { bracketMatching, defaultHighlightStyle, indentOnInput, syntaxHighlighting } from '@codemirror/language';
import { lintGutter, linter, setDiagnostics } from '@codemirror/lint';
import { yaml } from '@codemirror/lang-yaml';
import { stringify } from 'yaml';
import { api, ApiError, KINDS } from '../api.js';
import { nameFirst } from '../kinds.js';
import { locateError } from '../yamlpath.js';
import { Changes, ErrorBox, Loading } from '../ui.jsx';

/** How long the typing must pause before the server validates. */
const VALIDATE_DELAY_MS = 400;

const NEW_DOCUMENT = `# A policy document: every resource in it is created or replaced.
namespaces:
  - name: example
    hosts: [example.local]
backends:
  - name: example/web
    endpoints:
      - address: 127.0.0.1:8081
routes:
  - name: example/root
    match: { prefix: / }
    backend: web
`;

/** The document to edit and the policy ETag it was read at. */
async function loadDocument(mode, kind, name) {
  // The revision is read before the resources: if a write slips in between,
  // the ETag is older than the text and the apply gets a 412 (safe); read
  // the other way round, a newer ETag could overwrite that write unseen.
  const { etag, data: revision } = await api('/v1/revision');
  const header = (what) =>
    `# ${what} at revision ${revision.revision}. Apply creates or replaces each resource\n` +
    `# below (it deletes nothing); a change made meanwhile by someone else is refused.\n`;
  if (mode === 'new') return { text: NEW_DOCUMENT, etag, revision: revision.revision };
  if (mode === 'resource') {
    const { data } = await api(`/v1/${kind}/${name}`);
    const text = header(`${KINDS.find((k) => k.plural === kind)?.kind || kind} ${name}`) + stringify({ [kind]: [nameFirst(data)] }, { lineWidth: 0 });
    return { text, etag, revision: revision.revision };
  }
  const document = {};
  for (const { plural } of KINDS) {
    // Secrets are shown only as names and expiry, which cannot be applied
    // back; they are written in documents of their own.
    if (plural === 'secrets') continue;
    const { data } = await api(`/v1/${plural}`);
    if (data.items.length > 0) document[plural] = data.items.map(nameFirst);
  }
  const body = Object.keys(document).length > 0 ? stringify(document, { lineWidth: 0 }) : '';
  const text = header('The whole policy') + '# Secrets are not shown: their key material never leaves the control plane.\n' + body;
  return { text, etag, revision: revision.revision };
}

/**
 * The element to mount the editor in, inside a shadow root of `host`.
 * CodeMirror injects its styles at run time: into a document, as a
 * `<style>` element, which the console's Content-Security-Policy
 * (`style-src 'self'`) refuses; into a shadow root, as a constructed
 * stylesheet, which it allows. The shadow root links app.css for the
 * console's own editor styles.
 */
function editorRoot(host) {
  const shadow = host.shadowRoot || host.attachShadow({ mode: 'open' });
  shadow.replaceChildren();
  const styles = document.createElement('link');
  styles.rel = 'stylesheet';
  styles.href = '/ui/app.css';
  const mount = document.createElement('div');
  mount.className = 'editor-mount';
  shadow.append(styles, mount);
  return mount;
}

/** What the latest dry run said. */
const IDLE = { state: 'idle', changes: null, error: null };

export function EditorPage({ me, params }) {
  const canEdit = me.role !== 'viewer';
  const kind = params.get('kind');
  const name = params.get('name');
  const mode = kind && name ? 'resource' : params.get('new') ? 'new' : 'policy';
  const [base, setBase] = useState(null);
  const [loadError, setLoadError] = useState(null);
  const [check, setCheck] = useState(IDLE);
  const [conflict, setConflict] = useState(null);
  const [applying, setApplying] = useState(false);
  const [applied, setApplied] = useState(null);
  const [applyError, setApplyError] = useState(null);
  const host = useRef(null);
  const view = useRef(null);
  // The If-Match of dry runs and the apply: the policy's ETag when loaded.
  const etag = useRef(null);
  const checkNow = useRef(() => {});
  const [reloads, setReloads] = useState(0);

  useEffect(() => {
    let live = true;
    setBase(null);
    setLoadError(null);
    setConflict(null);
    setApplied(null);
    setApplyError(null);
    setCheck(IDLE);
    loadDocument(mode, kind, name).then(
      (loaded) => {
        if (!live) return;
        etag.current = loaded.etag;
        setBase(loaded);
      },
      (error) => live && setLoadError(error),
    );
    return () => {
      live = false;
    };
  }, [mode, kind, name, reloads]);

  useEffect(() => {
    if (!base) return undefined;
    // Each dry run is numbered; only the newest may update the page.
    let sequence = 0;
    async function validate(editor) {
      const text = editor.state.doc.toString();
      const mine = ++sequence;
      setCheck((c) => ({ ...c, state: 'checking' }));
      try {
        const headers = etag.current ? { 'If-Match': etag.current } : {};
        const { data } = await api('/v1/apply?dry_run=true', {
          method: 'POST',
          body: text,
          contentType: 'application/yaml',
          headers,
        });
        if (mine === sequence) {
          setConflict(null);
          setCheck({ state: 'ok', changes: data.changes, error: null });
        }
        return [];
      } catch (error) {
        if (mine !== sequence) return [];
        if (error.status === 412) {
          setConflict(error);
          setCheck({ state: 'conflict', changes: null, error: null });
          return [];
        }
        if (!(error instanceof ApiError) || error.status === 0 || error.status >= 500) {
          setCheck({ state: 'failed', changes: null, error });
          return [];
        }
        setCheck({ state: 'invalid', changes: null, error });
        const { from, to } = locateError(text, error);
        const where = error.resource ? `${error.resource}: ` : '';
        return [
          {
            from,
            to: Math.max(to, from),
            severity: 'error',
            source: error.field || error.code,
            message: `${where}${error.field ? `${error.field}: ` : ''}${error.message}`,
          },
        ];
      }
    }
    const extensions = [
      lineNumbers(),
      highlightActiveLineGutter(),
      history(),
      drawSelection(),
      indentOnInput(),
      bracketMatching(),
      highlightActiveLine(),
      syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
      keymap.of([...defaultKeymap, ...historyKeymap, indentWithTab]),
      yaml(),
      EditorView.contentAttributes.of({ 'aria-label': 'Policy document (YAML)' }),
    ];
    if (canEdit) {
      extensions.push(lintGutter(), linter(validate, { delay: VALIDATE_DELAY_MS }));
    } else {
      extensions.push(EditorState.readOnly.of(true), EditorView.editable.of(false));
    }
    // The linter runs only after an edit; this validates on demand too
    // (after an apply, or with a new base), marking errors the same way.
    checkNow.current = async () => {
      const editor = view.current;
      if (!editor) return;
      const doc = editor.state.doc;
      const diagnostics = await validate(editor);
      if (view.current === editor && editor.state.doc === doc) {
        editor.dispatch(setDiagnostics(editor.state, diagnostics));
      }
    };
    view.current = new EditorView({
      state: EditorState.create({ doc: base.text, extensions }),
      parent: editorRoot(host.current),
      root: host.current.shadowRoot,
    });
    return () => {
      sequence = -1;
      view.current.destroy();
      view.current = null;
    };
  }, [base]);

  /** Validates again now, e.g. after the base ETag moved. */
  const revalidate = () => checkNow.current();

  async function apply() {
    setApplying(true);
    setApplyError(null);
    setApplied(null);
    try {
      const { data, etag: now } = await api('/v1/apply', {
        method: 'POST',
        body: view.current.state.doc.toString(),
        contentType: 'application/yaml',
        headers: etag.current ? { 'If-Match': etag.current } : {},
      });
      etag.current = now;
      setApplied(data);
      revalidate();
    } catch (error) {
      if (error.status === 412) {
        setConflict(error);
        setCheck({ state: 'conflict', changes: null, error: null });
      } else {
        setApplyError(error);
      }
    } finally {
      setApplying(false);
    }
  }

  /** Keeps the text, and takes the policy as it is now as the new base. */
  function rebase() {
    if (conflict && conflict.etag) etag.current = conflict.etag;
    setConflict(null);
    revalidate();
  }

  const title =
    mode === 'resource' ? `${kind} / ${name}` : mode === 'new' ? 'New policy document' : 'Whole policy';
  const ready = check.state === 'ok' && check.changes && check.changes.length > 0;
  return (
    <section class="editor-page">
      <header class="page-head">
        <h2>Edit: {title}</h2>
        <div class="tools">
          {base ? <span class="muted">base revision {base.revision}</span> : null}
          {canEdit ? (
            <>
              <span class={`check check-${check.state}`} data-testid="check-state">
                {
                  {
                    idle: 'not validated yet',
                    checking: 'validating…',
                    ok: 'valid',
                    invalid: 'refused by the server',
                    conflict: 'conflict',
                    failed: 'validation failed',
                  }[check.state]
                }
              </span>
              <button
                type="button"
                class="primary"
                data-testid="apply"
                data-edit
                disabled={!ready || applying || conflict}
                onClick={apply}
              >
                {applying ? 'Applying…' : 'Apply'}
              </button>
            </>
          ) : (
            <span class="muted" data-testid="read-only">read only: a viewer token cannot change the policy</span>
          )}
        </div>
      </header>
      <ErrorBox error={loadError} />
      {conflict ? (
        <div class="error conflict" role="alert" data-testid="conflict">
          <strong>412 conflict:</strong> {conflict.message}. Nothing was applied. Your text is kept:{' '}
          <button type="button" onClick={rebase} data-edit>
            Compare with the current policy
          </button>{' '}
          <button type="button" onClick={() => setReloads((n) => n + 1)}>
            Discard my text and reload
          </button>
        </div>
      ) : null}
      {applied ? (
        <div class="ok" role="status" data-testid="applied">
          {applied.unchanged
            ? 'Nothing to apply: the policy already says this.'
            : `Applied as revision ${applied.revision}: ${applied.changes.length} change(s).`}{' '}
          <a href="#/history">History</a>
        </div>
      ) : null}
      <ErrorBox error={applyError} />
      {!base && !loadError ? <Loading what="the document" /> : null}
      <div class="editor-grid">
        <div class="editor" ref={host} data-testid="editor" />
        {canEdit ? (
          <aside class="preview">
            <h3>Changes {base ? `against revision ${base.revision}` : ''}</h3>
            {check.state === 'invalid' && check.error ? (
              <div class="error" data-testid="validation-error">
                <strong>{check.error.status} {check.error.code}</strong>
                {check.error.resource ? <> in <code>{check.error.resource}</code></> : null}
                {check.error.field ? <> at <code data-testid="error-field">{check.error.field}</code></> : null}: {check.error.message}
              </div>
            ) : null}
            {check.state === 'failed' ? <ErrorBox error={check.error} /> : null}
            {check.state === 'ok' ? <Changes changes={check.changes} empty="No changes: applying this would change nothing." /> : null}
            {check.state === 'idle' || check.state === 'checking' ? <p class="muted">Validating with the server…</p> : null}
          </aside>
        ) : null}
      </div>
    </section>
  );
}
