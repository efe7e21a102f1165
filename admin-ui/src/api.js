// The admin API client. The console is served from the API's own origin, so
// every call is a same-origin fetch carrying the bearer token the operator
// signed in with (kept in sessionStorage: it lives as long as the tab and is
// never sent anywhere but this origin). A 401 ends the session: the token was
// revoked or never valid, and the console returns to sign-in.

const TOKEN_KEY = 'prism.token';

/** The window event sent after every write the console makes. */
export const WRITTEN = 'prism:written';

let token = sessionStorage.getItem(TOKEN_KEY) || '';
const listeners = new Set();

/** The token of this tab's session, or '' when signed out. */
export function currentToken() {
  return token;
}

/**
 * Keeps `value` as this tab's token ('' signs out) and tells the app, with
 * `reason` when the session ended by itself.
 */
export function setToken(value, reason = '') {
  token = value;
  if (value) {
    sessionStorage.setItem(TOKEN_KEY, value);
  } else {
    sessionStorage.removeItem(TOKEN_KEY);
  }
  for (const listener of listeners) listener(value, reason);
}

/** Calls `listener(token, reason)` whenever the session starts or ends. */
export function onSession(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/** A refused or failed call: the API's `{"error": {code, message, field, resource}}`. */
export class ApiError extends Error {
  constructor(status, body, headers) {
    const detail = (body && body.error) || {};
    super(detail.message || (typeof body === 'string' && body) || `HTTP ${status}`);
    this.status = status;
    this.code = detail.code || '';
    this.field = detail.field || '';
    this.resource = detail.resource || '';
    this.etag = headers ? headers.get('ETag') : null;
  }
}

/**
 * One call of the admin API. `body` is sent as is with `contentType`
 * (JSON by default); answers are parsed as JSON when they are JSON.
 * Resolves to `{data, etag, headers}`; rejects with an ApiError.
 */
export async function api(path, { method = 'GET', body, contentType, headers = {}, signal } = {}) {
  const sent = { Authorization: `Bearer ${token}`, ...headers };
  if (body !== undefined) sent['Content-Type'] = contentType || 'application/json';
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body, cache: 'no-store', signal });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(0, `the admin API is unreachable: ${error.message}`);
  }
  const text = await response.text();
  let data = text;
  if ((response.headers.get('Content-Type') || '').includes('json')) {
    try {
      data = JSON.parse(text);
    } catch {
      // Left as text: the error below says what came back.
    }
  }
  if (response.status === 401) {
    setToken('', 'The admin API refused the token (401): it is unknown or was revoked.');
  }
  if (!response.ok) {
    throw new ApiError(response.status, data, response.headers);
  }
  if (method !== 'GET' && !/[?&]dry_run=true/.test(path)) {
    // A write went through: whatever shows the revision reads it again.
    window.dispatchEvent(new Event(WRITTEN));
  }
  return { data, etag: response.headers.get('ETag'), headers: response.headers };
}

/** `GET path`'s JSON answer. */
export async function get(path, options) {
  return (await api(path, options)).data;
}

export { KINDS, pluralOf } from './kinds.js';
