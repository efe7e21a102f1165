// Builds the console into dist/: index.html, app.js, app.css. The names are
// fixed and the output carries no hash or timestamp, so the same sources and
// lockfile always give the same bytes (CI rebuilds and compares with the
// committed dist/, which the control plane embeds).
//
//   node build.mjs            build once
//   node build.mjs --watch    rebuild on every change (see README.md)
import * as esbuild from 'esbuild';
import { copyFile, mkdir } from 'node:fs/promises';

const watch = process.argv.includes('--watch');

const options = {
  entryPoints: { app: 'src/main.jsx' },
  outdir: 'dist',
  bundle: true,
  minify: true,
  format: 'iife',
  target: ['chrome111', 'firefox115', 'safari16.4'],
  jsx: 'automatic',
  jsxImportSource: 'preact',
  charset: 'utf8',
  // The bundled libraries' licence comments, kept at the end of each file.
  legalComments: 'eof',
  sourcemap: false,
  logLevel: 'info',
  plugins: [
    {
      name: 'index.html',
      setup(build) {
        build.onEnd(async (result) => {
          if (result.errors.length === 0) {
            await copyFile('src/index.html', 'dist/index.html');
          }
        });
      },
    },
  ],
};

await mkdir('dist', { recursive: true });
if (watch) {
  const context = await esbuild.context(options);
  await context.watch();
} else {
  await esbuild.build(options);
}
