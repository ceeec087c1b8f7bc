// A parser for server-sent events read over fetch: EventSource cannot send an
// Authorization header, so the page reads the stream itself.

export class SseParser {
  constructor() {
    this.lastEventId = '';
    this.retryMs = null;
    this.reset();
  }

  reset() { // a new connection: the event being built is dropped, the last id kept
    this.buf = '';
    this.data = [];
    this.type = '';
    this.idBuffer = this.lastEventId;
  }

  // Feed decoded text; returns the events it completed.
  push(text) {
    this.buf += text;
    const events = [];
    for (;;) {
      const cr = this.buf.indexOf('\r');
      const lf = this.buf.indexOf('\n');
      let i;
      if (cr < 0) i = lf;
      else if (lf < 0) i = cr;
      else i = Math.min(cr, lf);
      if (i < 0) break;
      // A CR at the end may be half of a CRLF: wait for the next chunk.
      if (this.buf[i] === '\r' && i === this.buf.length - 1) break;
      const line = this.buf.slice(0, i);
      const skip = this.buf[i] === '\r' && this.buf[i + 1] === '\n' ? 2 : 1;
      this.buf = this.buf.slice(i + skip);
      const ev = this.line(line);
      if (ev) events.push(ev);
    }
    return events;
  }

  line(line) {
    if (line === '') {
      this.lastEventId = this.idBuffer;
      if (this.data.length === 0) {
        this.type = '';
        return null;
      }
      const ev = { id: this.lastEventId, event: this.type || 'message',
        data: this.data.join('\n') };
      this.data = [];
      this.type = '';
      return ev;
    }
    if (line.startsWith(':')) return null; // a comment (keep-alive)
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.type = value;
    else if (field === 'id' && !value.includes('\0')) this.idBuffer = value;
    else if (field === 'retry' && /^\d+$/.test(value)) this.retryMs = Number(value);
    return null;
  }
}
