// Talking to the gateway: every request carries the key typed on the page, and every
// failure becomes an ApiError with the server's own message when it sent one.

import { els } from './dom.js';

export class ApiError extends Error {
  constructor(message, code, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = els.apiKey.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

export async function errorFrom(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    // not JSON (a proxy's page, say): fall through to the status line
  }
  const err = body && body.error;
  if (err && typeof err.message === 'string') {
    return new ApiError(err.message, err.code || `http_${resp.status}`, resp.status);
  }
  const text = `The server answered ${resp.status} ${resp.statusText || ''}`.trim();
  return new ApiError(text, `http_${resp.status}`, resp.status);
}

export function networkError(e) {
  return new ApiError(`Could not reach the server (${e.message || e}).`, 'network', 0);
}

export async function api(url, opts = {}) {
  let resp;
  try {
    resp = await fetch(url, { cache: 'no-store', ...opts, headers: authHeaders(opts.headers) });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw networkError(e);
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

export const jobUrl = (id, tail = '') => `v1/jobs/${encodeURIComponent(id)}${tail}`;

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) {
      reject(new DOMException('aborted', 'AbortError'));
      return;
    }
    const t = setTimeout(resolve, ms);
    if (signal) {
      signal.addEventListener('abort', () => {
        clearTimeout(t);
        reject(new DOMException('aborted', 'AbortError'));
      }, { once: true });
    }
  });
}
