// Live traffic from the control plane: `GET /v1/traffic/stream`, one
// `event: traffic` per interval whose `data:` is the JSON of
// `GET /v1/traffic`. EventSource cannot send the Authorization header, so the
// stream is read with fetch() and a ReadableStream reader. When the stream
// fails it is opened again with backoff, and `/v1/traffic` is polled in the
// meantime so the charts keep moving.

import { useEffect, useState } from 'preact/hooks';
import { api, currentToken, setToken } from './api.js';
import { eventParser } from './sse.js';

const FIRST_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 30000;
const DEFAULT_INTERVAL_MS = 2000;
/** How often to ask again while the control plane has no traffic API. */
const UNAVAILABLE_RETRY_MS = 30000;

/**
 * Follows the traffic feed until the returned function is called.
 * `onUpdate({traffic, state, error})`: state is `connecting`, `live`
 * (streaming), `polling` (the stream failed; polled meanwhile) or
 * `unavailable` (this control plane has no traffic API).
 */
export function followTraffic(onUpdate) {
  let stopped = false;
  let controller = null;
  let timer = null;
  let intervalMs = DEFAULT_INTERVAL_MS;
  let backoffMs = FIRST_BACKOFF_MS;

  const wait = (ms) =>
    new Promise((resolve) => {
      timer = setTimeout(resolve, ms);
    });

  const publish = (traffic, state, error = null) => {
    if (stopped) return;
    if (traffic && traffic.interval_seconds > 0) intervalMs = traffic.interval_seconds * 1000;
    onUpdate({ traffic, state, error });
  };

  async function stream() {
    controller = new AbortController();
    const response = await fetch('/v1/traffic/stream', {
      headers: { Authorization: `Bearer ${currentToken()}`, Accept: 'text/event-stream' },
      cache: 'no-store',
      signal: controller.signal,
    });
    if (response.status === 401) {
      setToken('', 'The admin API refused the token (401): it is unknown or was revoked.');
      return 'signed-out';
    }
    if (!response.ok || !response.body) {
      return response.status === 404 ? 'missing' : 'failed';
    }
    backoffMs = FIRST_BACKOFF_MS;
    publish(null, 'live');
    const feed = eventParser((type, data) => {
      if (type !== 'traffic') return;
      try {
        publish(JSON.parse(data), 'live');
      } catch (error) {
        publish(null, 'live', `a traffic event that is not JSON: ${error.message}`);
      }
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return 'failed';
      feed(value);
    }
  }

  /** Polls `/v1/traffic` for `forMs`; false when the API is not there. */
  async function poll(forMs) {
    const until = Date.now() + forMs;
    do {
      try {
        const { data } = await api('/v1/traffic');
        publish(data, 'polling');
      } catch (error) {
        if (error.status === 401) return true;
        if (error.status === 404) return false;
        publish(null, 'polling', error.message);
      }
      if (stopped) return true;
      await wait(Math.min(intervalMs, Math.max(0, until - Date.now())));
    } while (!stopped && Date.now() < until);
    return true;
  }

  (async () => {
    publish(null, 'connecting');
    while (!stopped) {
      let outcome;
      try {
        outcome = await stream();
      } catch (error) {
        outcome = stopped ? 'stopped' : 'failed';
      }
      if (stopped || outcome === 'signed-out') return;
      const available = await poll(backoffMs);
      if (stopped) return;
      if (!available) {
        publish(null, 'unavailable');
        await wait(UNAVAILABLE_RETRY_MS);
        continue;
      }
      if (outcome === 'missing') {
        // A traffic API without the stream: polling is all there is.
        await poll(UNAVAILABLE_RETRY_MS);
        continue;
      }
      backoffMs = Math.min(backoffMs * 2, MAX_BACKOFF_MS);
    }
  })();

  return () => {
    stopped = true;
    clearTimeout(timer);
    if (controller) controller.abort();
  };
}

/** The latest traffic while the component is mounted (and `enabled`). */
export function useTraffic(enabled = true) {
  const [update, setUpdate] = useState({ traffic: null, state: 'connecting', error: null });
  useEffect(
    () =>
      enabled
        ? followTraffic((next) =>
            setUpdate((previous) => ({
              traffic: next.traffic || previous.traffic,
              state: next.state,
              error: next.error,
            })),
          )
        : undefined,
    [enabled],
  );
  return update;
}

/** `rows` (the traffic's `routes`, `backends`…) by `key(row)`. */
export function indexBy(rows, key) {
  const map = new Map();
  for (const row of rows || []) map.set(key(row), row);
  return map;
}

/** A period of the traffic API (`summary_seconds`…): "10 s", "5 min". */
export function formatPeriod(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return '–';
  if (seconds >= 60 && seconds % 60 === 0) return `${seconds / 60} min`;
  return `${Number(seconds.toFixed(1))} s`;
}

export function formatRate(value) {
  if (value == null) return '–';
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

export function formatPercent(value) {
  if (value == null) return '–';
  return `${(value * 100).toFixed(value >= 0.1 ? 0 : 1)}%`;
}

export function formatMs(value) {
  if (value == null) return '–';
  if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
  if (value >= 100) return `${value.toFixed(0)} ms`;
  return value >= 1 ? `${value.toFixed(1)} ms` : `${value.toFixed(2)} ms`;
}
