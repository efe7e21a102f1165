// Tick labels for the charts' y axes. uPlot picks ticks `step` apart (1, 2,
// 2.5 or 5 × 10ⁿ) and hands them to the axis' `values`; these label them with
// as many decimals as the step needs, so ticks 10 ms apart read "0 ms",
// "10 ms", "20 ms" and ticks 0.05 ms apart "0 ms", "0.05 ms", "0.1 ms",
// never the same label twice.

/** Decimals that tell apart numbers `step` apart (0 for 10, 2 for 0.25). */
export function stepDecimals(step) {
  if (!(step > 0) || !Number.isFinite(step)) return 0;
  for (let decimals = 0; decimals < 12; decimals++) {
    const scaled = step * 10 ** decimals;
    if (Math.abs(scaled - Math.round(scaled)) <= 1e-6 * scaled) return decimals;
  }
  return 12;
}

/** `value` with `decimals`, without trailing zeros ("0.50" → "0.5"). */
function trimmed(value, decimals) {
  const text = value.toFixed(decimals);
  const plain = text.includes('.') ? text.replace(/\.?0+$/, '') : text;
  return plain === '-0' ? '0' : plain;
}

/** Latencies in milliseconds: in ms, or in s once the ticks reach 1000 ms. */
export function msTicks(ticks, step) {
  const top = Math.max(0, ...ticks.filter((t) => t != null));
  if (top >= 1000) {
    const decimals = stepDecimals(step / 1000);
    return ticks.map((t) => (t == null ? '' : `${trimmed(t / 1000, decimals)} s`));
  }
  const decimals = stepDecimals(step);
  return ticks.map((t) => (t == null ? '' : `${trimmed(t, decimals)} ms`));
}

/** Rates per second. */
export function rateTicks(ticks, step) {
  const decimals = stepDecimals(step);
  return ticks.map((t) => (t == null ? '' : trimmed(t, decimals)));
}

/** Fractions (0.01) as percentages ("1%"). */
export function percentTicks(ticks, step) {
  const decimals = stepDecimals(step * 100);
  return ticks.map((t) => (t == null ? '' : `${trimmed(t * 100, decimals)}%`));
}
