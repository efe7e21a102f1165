// An endpoint's live state, as the traffic API sums it over the proxies that
// reported it lately (`backends[].endpoints[]` of `GET /v1/traffic`): one
// short line for a badge, a level for its colour and a longer title.

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

/**
 * `health`: the endpoint's `EndpointHealth` (`proxies`, `healthy`,
 * `unhealthy`, `breaker_open`, `breaker_half_open`, `ejected`), or null
 * when no proxy reported it. Returns `{level, text, title}`, level one of
 * `good` (health checked, healthy everywhere), `plain` (no health check,
 * nothing wrong), `warn` (trouble on some proxies), `bad` (on every one) or
 * `none` (no proxy reports it).
 */
export function endpointState(health, period = 'the last interval') {
  if (!health || !(health.proxies > 0)) {
    return {
      level: 'none',
      text: 'no proxy reports it',
      title: `No proxy reported this endpoint in ${period}.`,
    };
  }
  const p = health.proxies;
  const healthy = health.healthy || 0;
  const unhealthy = health.unhealthy || 0;
  const open = health.breaker_open || 0;
  const halfOpen = health.breaker_half_open || 0;
  const ejected = health.ejected || 0;

  const parts = [];
  if (healthy + unhealthy === 0) parts.push(`not health checked (${plural(p, 'proxy', 'proxies')})`);
  else if (unhealthy === 0) parts.push(`healthy ${healthy}/${p}`);
  else parts.push(`unhealthy on ${unhealthy} of ${plural(p, 'proxy', 'proxies')}`);
  if (open) parts.push(`breaker open on ${open}`);
  if (halfOpen) parts.push(`breaker half-open on ${halfOpen}`);
  if (ejected) parts.push(`ejected on ${ejected}`);

  const troubles = [unhealthy, open, ejected];
  let level;
  if (troubles.some((n) => n >= p)) level = 'bad';
  else if (troubles.some((n) => n > 0) || halfOpen > 0) level = 'warn';
  else level = healthy > 0 ? 'good' : 'plain';

  const title =
    `${plural(p, 'proxy reports', 'proxies report')} this endpoint (${period}): ` +
    [
      healthy + unhealthy === 0 ? 'no health check' : `${healthy} healthy, ${unhealthy} unhealthy`,
      `breaker open on ${open}, half-open on ${halfOpen}`,
      `ejected by outlier detection on ${ejected}`,
    ].join('; ') +
    '.';
  return { level, text: parts.join(' · '), title };
}
