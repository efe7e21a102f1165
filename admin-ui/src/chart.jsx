// A live line chart (uPlot) of one namespace's traffic series. The chart is
// made once and fed with setData on every update, so a stream of updates
// moves it without rebuilding the canvas.

import { useEffect, useRef } from 'preact/hooks';
import uPlot from 'uplot';

const HEIGHT = 140;

/**
 * `series`: the traffic API's points, oldest first. `lines`: what to draw,
 * each `{label, value(point), stroke}`; `format(v)` labels the y axis,
 * which reaches at least `floor`.
 */
export function Chart({ title, series, lines, format, testId, floor = 1 }) {
  const box = useRef(null);
  const plot = useRef(null);
  const points = series || [];
  const data = [
    points.map((p) => p.t_unix_ms / 1000),
    ...lines.map((line) => points.map((p) => line.value(p) ?? null)),
  ];

  useEffect(() => {
    const width = Math.max(240, box.current.clientWidth);
    plot.current = new uPlot(
      {
        width,
        height: HEIGHT,
        legend: { show: true, live: false },
        cursor: { drag: { x: false, y: false } },
        // From zero, and at least up to `floor`, so a quiet series is a
        // flat line at the bottom rather than noise blown up to full height.
        scales: { x: { time: true }, y: { range: (_, min, max) => [0, Math.max((max || 0) * 1.15, floor)] } },
        axes: [
          { stroke: '#667', grid: { stroke: '#eef' }, size: 30 },
          { stroke: '#667', grid: { stroke: '#eef' }, size: 56, values: (_, ticks) => ticks.map(format) },
        ],
        series: [
          {},
          ...lines.map((line) => ({
            label: line.label,
            stroke: line.stroke,
            width: 1.5,
            spanGaps: false,
            value: (_, v) => (v == null ? '–' : format(v)),
          })),
        ],
      },
      data,
      box.current,
    );
    const resize = () => plot.current.setSize({ width: Math.max(240, box.current.clientWidth), height: HEIGHT });
    window.addEventListener('resize', resize);
    return () => {
      window.removeEventListener('resize', resize);
      plot.current.destroy();
    };
  }, []);

  useEffect(() => {
    if (plot.current) plot.current.setData(data);
  });

  // What the chart shows now, for people using a screen reader and for the
  // browser tests: the time of the newest point and its values.
  const last = points[points.length - 1];
  return (
    <figure class="chart">
      <figcaption>{title}</figcaption>
      <div
        ref={box}
        data-testid={testId}
        data-points={points.length}
        data-last-t={last ? last.t_unix_ms : ''}
        data-last={last ? lines.map((line) => line.value(last) ?? '').join(',') : ''}
      />
    </figure>
  );
}
