// A text/event-stream parser (the WHATWG "server-sent events" format) for
// a stream read with fetch(): EventSource cannot send the Authorization
// header. No browser APIs here: the unit tests import it under Node.

/**
 * Splits a text/event-stream into events: `feed(chunk)` calls
 * `onEvent(type, data)` for each complete event (blank-line terminated).
 */
export function eventParser(onEvent) {
  let buffer = '';
  let type = '';
  let data = [];
  return function feed(chunk) {
    buffer += chunk;
    let newline;
    while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
      // A CR that ends the chunk may be the first half of a CRLF: wait.
      if (buffer[newline] === '\r' && newline === buffer.length - 1) break;
      const line = buffer.slice(0, newline);
      const width = buffer.startsWith('\r\n', newline) ? 2 : 1;
      buffer = buffer.slice(newline + width);
      if (line === '') {
        if (data.length > 0) onEvent(type || 'message', data.join('\n'));
        type = '';
        data = [];
        continue;
      }
      if (line.startsWith(':')) continue; // a comment: keep-alive
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
  };
}
