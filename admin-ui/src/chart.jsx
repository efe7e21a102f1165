// A live line chart (uPlot) of one namespace's traffic series. The chart is
// made once and fed with setData on every update, so a stream of updates
// moves it without rebuilding the canvas.

import { useEffect, useRef } from 'preact/hooks';
import uPlot from 'uplot';

const HEIGHT = 140;

/** The y axis' least width (px), so that charts side by side line up. */
const MIN_AXIS = 48;

/**
 * The y axis' width: its widest label, its ticks and the gap between. A
 * fixed width cuts the start off longer labels ("10 ms" read "0 ms"). On
 * uPlot's later sizing passes the width stays, so sizing converges.
 */
function axisSize(self, values, axisIdx, cycleNum) {
  const axis = self.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  let widest = 0;
  if (values && values.length) {
    self.ctx.font = axis.font[0];
    for (const value of values) widest = Math.max(widest, self.ctx.measureText(String(value)).width);
    widest /= uPlot.pxRatio;
  }
  return Math.max(MIN_AXIS, Math.ceil(widest + axis.ticks.size + axis.gap + 2));
}

/**
 * `series`: the traffic API's points, oldest first. `lines`: what to draw,
 * each `{label, value(point), stroke}`; `format(v)` labels values in the
 * legend and `ticks(values, step)` the y axis (see ticks.js), which reaches
 * at least `floor`.
 */
export function Chart({ title, series, lines, format, ticks, testId, floor = 1 }) {
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
          {
            stroke: '#667',
            grid: { stroke: '#eef' },
            size: axisSize,
            values: (_, values, _axis, _space, step) => (ticks ? ticks(values, step) : values.map((v) => (v == null ? '' : format(v)))),
          },
        ],
        // For the browser tests: the y axis' labels, and how many of them
        // are wider than the axis leaves room for (drawn cut off).
        hooks: {
          draw: [
            (self) => {
              const axis = self.axes[1];
              const labels = axis._values || [];
              self.ctx.font = axis.font[0];
              const room = axis._size - axis.ticks.size - axis.gap;
              const cut = labels.filter((l) => self.ctx.measureText(String(l)).width / uPlot.pxRatio > room).length;
              box.current.dataset.yTicks = labels.join('|');
              box.current.dataset.yTicksCut = String(cut);
            },
          ],
        },
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
