// Where in a policy document the admin API's error points. A refused
// document names the field as a path into the document
// (`backends[0].endpoints[0].address`); a rule across resources names the
// resource (`Route demo/root`) and a path inside it (`backend`); a syntax
// error says `at line L column C`. Each becomes a range of the text.

import { isMap, isScalar, isSeq, parseDocument } from 'yaml';
import { pluralOf } from './kinds.js';

/** `routes[0].match.headers[1].regex` → `['routes', 0, 'match', 'headers', 1, 'regex']`. */
export function parseFieldPath(field) {
  const path = [];
  for (const match of (field || '').matchAll(/([^.[\]]+)|\[(\d+)\]/g)) {
    path.push(match[2] !== undefined ? Number(match[2]) : match[1]);
  }
  return path;
}

/** `default_timeout` → `defaultTimeout`: documents may use either. */
function camel(name) {
  return name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
}

function pairOf(map, key) {
  return map.items.find((pair) => {
    const name = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
    return name === key || name === camel(key);
  });
}

/** The index in the `plural` list of the resource named `name`, or -1. */
function indexOfResource(doc, plural, name) {
  const list = doc.get(plural, true);
  if (!isSeq(list)) return -1;
  return list.items.findIndex((item) => isMap(item) && item.get('name') === name);
}

/**
 * The range `{from, to, exact}` of `text` that the error points at, or null
 * when the document cannot be read at all. `exact` is false when only an
 * enclosing part was found (e.g. the field is missing, so its parent is shown).
 */
export function locateField(text, field, resource) {
  let doc;
  try {
    doc = parseDocument(text);
  } catch {
    return null;
  }
  let path = parseFieldPath(field);
  if (resource) {
    const space = resource.indexOf(' ');
    const plural = pluralOf(resource.slice(0, space));
    const index = indexOfResource(doc, plural, resource.slice(space + 1));
    if (index >= 0) path = [plural, index, ...path];
  }
  let node = doc.contents;
  let found = null; // the deepest pair or item reached
  let exact = true;
  for (const step of path) {
    let hit = null;
    if (typeof step === 'number' && isSeq(node) && step < node.items.length) {
      hit = { key: null, value: node.items[step] };
    } else if (typeof step === 'string' && isMap(node)) {
      const pair = pairOf(node, step);
      if (pair) hit = { key: pair.key, value: pair.value };
    }
    if (!hit) {
      exact = false;
      break;
    }
    found = hit;
    node = hit.value;
  }
  if (!found) return { from: 0, to: firstLineEnd(text, 0), exact: false };
  const { key, value } = found;
  const keyRange = key && key.range;
  const valueRange = value && value.range;
  // A scalar: the key and its value; a block: its key, or its first line.
  if (keyRange && valueRange && isScalar(value)) {
    return { from: keyRange[0], to: valueRange[1], exact };
  }
  if (keyRange) return { from: keyRange[0], to: keyRange[1], exact };
  if (valueRange) {
    return { from: valueRange[0], to: Math.min(valueRange[1], firstLineEnd(text, valueRange[0])), exact };
  }
  return { from: 0, to: firstLineEnd(text, 0), exact: false };
}

function firstLineEnd(text, from) {
  const end = text.indexOf('\n', from);
  return end < 0 ? text.length : end;
}

/** A syntax error's `at line L column C` as a range of one character. */
function lineColumn(text, message) {
  const match = /line (\d+),? column (\d+)/.exec(message || '');
  if (!match) return null;
  const lines = text.split('\n');
  const line = Math.min(Number(match[1]), lines.length) - 1;
  let from = 0;
  for (let i = 0; i < line; i++) from += lines[i].length + 1;
  from += Math.min(Number(match[2]) - 1, lines[line].length);
  return { from, to: Math.min(from + 1, text.length), exact: true };
}

/** Where a refused document's error points: a range, or the first line. */
export function locateError(text, error) {
  const located =
    lineColumn(text, error.message) ||
    (error.field || error.resource ? locateField(text, error.field, error.resource) : null);
  return located || { from: 0, to: firstLineEnd(text, 0), exact: false };
}
