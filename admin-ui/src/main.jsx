// The Prism console: sign-in, navigation and hash routing (`#/routes`), so
// the server needs to know only `/ui` and its three files.

import 'uplot/dist/uPlot.min.css';
import './style.css';
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { KINDS, WRITTEN, api, currentToken, onSession, setToken } from './api.js';
import { EditorPage } from './pages/editor.jsx';
import { FleetPage } from './pages/fleet.jsx';
import { HistoryPage } from './pages/history.jsx';
import { OverviewPage } from './pages/overview.jsx';
import { ResourcePage } from './pages/resources.jsx';
import { useInterval } from './ui.jsx';

/** The current `#/page?query` as `{page, params}`. */
function parseHash() {
  const hash = window.location.hash.replace(/^#\/?/, '');
  const [page, query = ''] = hash.split('?');
  return { page: page || 'overview', params: new URLSearchParams(query) };
}

function useHash() {
  const [route, setRoute] = useState(parseHash);
  useEffect(() => {
    const changed = () => setRoute(parseHash());
    window.addEventListener('hashchange', changed);
    return () => window.removeEventListener('hashchange', changed);
  }, []);
  return route;
}

const PAGES = [
  { page: 'overview', title: 'Overview' },
  ...KINDS.map(({ plural, title }) => ({ page: plural, title })),
  { page: 'fleet', title: 'Fleet' },
  { page: 'history', title: 'History' },
  { page: 'edit', title: 'Editor' },
];

function SignIn({ error }) {
  const [value, setValue] = useState('');
  return (
    <main class="signin">
      <form
        onSubmit={(e) => {
          e.preventDefault();
          setToken(value.trim());
        }}
      >
        <h1>Prism console</h1>
        <p>Sign in with a bearer token of the admin API.</p>
        <label>
          Token
          <input
            type="password"
            name="token"
            autocomplete="off"
            placeholder="prism_…"
            value={value}
            onInput={(e) => setValue(e.currentTarget.value)}
            autofocus
          />
        </label>
        <button type="submit" class="primary" disabled={!value.trim()}>
          Sign in
        </button>
        {error ? (
          <p class="error" role="alert" data-testid="signin-error">
            {error}
          </p>
        ) : null}
        <p class="muted small">
          <code>prism up</code> writes an admin token to <code>./prism-data/admin-token</code>;{' '}
          <code>prism token create NAME --role viewer</code> makes a read-only one. The token is kept only in this tab
          (sessionStorage).
        </p>
      </form>
    </main>
  );
}

/** The current revision in the header, refreshed every few seconds. */
function Revision() {
  const [revision, setRevision] = useState(null);
  const refresh = () => api('/v1/revision').then(({ data }) => setRevision(data.revision), () => {});
  useEffect(() => {
    refresh();
    window.addEventListener(WRITTEN, refresh);
    return () => window.removeEventListener(WRITTEN, refresh);
  }, []);
  useInterval(refresh, 5000);
  return revision == null ? null : <span class="revision">r{revision}</span>;
}

function Page({ page, params, me }) {
  if (page === 'overview') return <OverviewPage />;
  if (page === 'fleet') return <FleetPage />;
  if (page === 'history') return <HistoryPage me={me} />;
  if (page === 'edit') return <EditorPage me={me} params={params} />;
  const kind = KINDS.find((k) => k.plural === page);
  if (kind) return <ResourcePage key={page} plural={kind.plural} title={kind.title} me={me} />;
  return <p class="error">No page `{page}`.</p>;
}

function App() {
  const [token, setSessionToken] = useState(currentToken);
  const [me, setMe] = useState(null);
  const [signInError, setSignInError] = useState('');
  const { page, params } = useHash();

  useEffect(
    () =>
      onSession((next, reason) => {
        setSessionToken(next);
        if (reason) setSignInError(reason);
      }),
    [],
  );
  useEffect(() => {
    setMe(null);
    if (!token) return;
    api('/v1/whoami').then(
      ({ data }) => {
        setSignInError('');
        setMe(data);
      },
      (error) => {
        if (error.status !== 401) {
          setSignInError(`Cannot sign in: ${error.message}`);
          setToken('');
        }
      },
    );
  }, [token]);

  if (!token) return <SignIn error={signInError} />;
  if (!me) return <p class="muted">Signing in…</p>;
  return (
    <div class="app" data-role={me.role}>
      <header class="top">
        <h1>
          <a href="#/overview">Prism</a>
        </h1>
        <nav>
          {PAGES.map((p) => (
            <a href={`#/${p.page}`} class={p.page === page ? 'active' : ''}>
              {p.title}
            </a>
          ))}
        </nav>
        <div class="me">
          <Revision />
          <span data-testid="whoami">
            {me.subject} · {me.role}
            {me.namespaces.length ? ` · ${me.namespaces.join(', ')}` : ''}
          </span>
          <button type="button" onClick={() => setToken('')}>
            Sign out
          </button>
        </div>
      </header>
      <main>
        <Page page={page} params={params} me={me} />
      </main>
    </div>
  );
}

render(<App />, document.getElementById('app'));
