// Following a submitted job: its progress over server-sent events (resumed with
// Last-Event-ID when a connection drops), or by polling where the stream is not
// available; then its end, shown through result.js. The job's id is kept in the tab's
// sessionStorage so that a reload picks the job up again.

import { api, authHeaders, errorFrom, jobUrl, networkError, sleep } from './api.js';
import { els } from './dom.js';
import { showError, showResult } from './result.js';
import { SseParser } from './sse.js';

const JOB_STORAGE = 'magicface.jobId';
const TERMINAL = new Set(['succeeded', 'failed', 'canceled', 'expired']);
export const STATUS_LABEL = {
  queued: 'Queued',
  running: 'Running',
  cancel_requested: 'Cancel requested',
  succeeded: 'Done',
  failed: 'Failed',
  canceled: 'Canceled',
  expired: 'Expired',
};
const STREAM_MAX_FAILURES = 3; // connections in a row without an event: then poll
const POLL_MS = 1000;

let activeJob = null;

export function jobInProgress() {
  return activeJob !== null;
}

function formatEta(s) {
  const sec = Math.max(0, Math.round(s));
  if (sec < 60) return `${sec} s`;
  const min = Math.floor(sec / 60);
  if (min < 60) return `${min} min ${sec % 60} s`;
  return `${Math.floor(min / 60)} h ${min % 60} min`;
}

function render(view) {
  const status = view.status;
  const p = view.progress || {};
  const terminal = TERMINAL.has(status);
  let percent = typeof p.percent === 'number' ? p.percent
    : p.total ? (100 * p.step) / p.total : 0;
  if (status === 'succeeded') percent = 100;
  percent = Math.min(100, Math.max(0, percent));
  els.progress.value = percent;
  els.progress.textContent = `${Math.round(percent)}%`;
  els.progress.dataset.status = status;
  const parts = [STATUS_LABEL[status] || status];
  if (status === 'queued' && typeof view.queue_position === 'number') {
    const ahead = view.queue_position;
    parts.push(ahead === 0 ? 'next in line' : `${ahead} job${ahead === 1 ? '' : 's'} ahead`);
  }
  if (p.total) parts.push(`step ${p.step ?? 0}/${p.total}`);
  parts.push(`${Math.round(percent)}%`);
  const eta = typeof p.eta_s === 'number' ? p.eta_s : view.eta_s;
  if (!terminal && typeof eta === 'number') parts.push(`about ${formatEta(eta)} left`);
  if (!terminal && p.stage) parts.push(`stage: ${p.stage}`);
  els.progressText.textContent = parts.join(' · ');
}

function setTransport(name) {
  els.progress.dataset.transport = name;
}

export function startJob(view) {
  const job = { id: view.id, view, abort: new AbortController(), done: false };
  activeJob = job;
  sessionStorage.setItem(JOB_STORAGE, job.id);
  els.statusBox.hidden = false;
  els.idleText.hidden = true;
  els.submit.disabled = true;
  els.submit.textContent = 'Generating…';
  els.cancel.disabled = false;
  els.cancel.textContent = 'Cancel';
  render(view);
  if (TERMINAL.has(view.status)) finishJob(job, view);
  else watch(job);
}

async function watch(job) {
  let view = null;
  try {
    view = await streamEvents(job);
    if (view === null) view = await poll(job);
    try { // the record as it stands now (the event's copy may be a moment old)
      const latest = await (await api(jobUrl(job.id), { signal: job.abort.signal })).json();
      if (TERMINAL.has(latest.status)) view = latest;
    } catch (e) {
      if (e.name === 'AbortError') return;
    }
  } catch (e) {
    if (e.name === 'AbortError' || job.done) return;
    showError(e);
    finishJob(job, null);
    return;
  }
  finishJob(job, view);
}

// Follow /events until a terminal event; reconnect with Last-Event-ID when the
// connection drops. Returns the terminal JobView, or null when the stream is not
// available (then the caller polls).
async function streamEvents(job) {
  const parser = new SseParser();
  const { signal } = job.abort;
  let failures = 0;
  for (;;) {
    let terminal = null;
    let gotEvent = false;
    try {
      const headers = { Accept: 'text/event-stream' };
      if (parser.lastEventId) headers['Last-Event-ID'] = parser.lastEventId;
      let resp;
      try {
        resp = await fetch(jobUrl(job.id, '/events'),
          { headers: authHeaders(headers), signal, cache: 'no-store' });
      } catch (e) {
        if (e.name === 'AbortError') throw e;
        throw networkError(e);
      }
      if (!resp.ok) {
        const err = await errorFrom(resp);
        if (resp.status === 401 || resp.status === 403) throw Object.assign(err, { fatal: true });
        if (resp.status < 500 && resp.status !== 429) return null; // no stream here: poll
        throw err;
      }
      const type = resp.headers.get('content-type') || '';
      if (!type.startsWith('text/event-stream') || !resp.body) return null;
      setTransport('events');
      parser.reset();
      // Read and decode here rather than through a TextDecoderStream: when the
      // connection drops, a pipe errors its readable side and discards what it still
      // holds, which can be the event just received, and then the resume asks for
      // it again or not at all.
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      try {
        while (!terminal) {
          const { value, done } = await reader.read();
          if (done) break;
          for (const ev of parser.push(decoder.decode(value, { stream: true }))) {
            gotEvent = true;
            failures = 0;
            terminal = handleEvent(job, ev);
            if (terminal) break;
          }
        }
      } finally {
        if (terminal) reader.cancel().catch(() => {});
      }
      if (terminal) return terminal;
    } catch (e) {
      if (e.name === 'AbortError' || e.fatal) throw e;
      // A dropped connection: try again below.
    }
    if (!gotEvent) failures += 1;
    if (failures >= STREAM_MAX_FAILURES) return null;
    const wait = parser.retryMs ?? Math.min(500 * 2 ** failures, 5000);
    await sleep(wait, signal);
  }
}

function handleEvent(job, ev) {
  let data;
  try {
    data = JSON.parse(ev.data);
  } catch (_) {
    return null;
  }
  if (!data || typeof data !== 'object') return null;
  if (ev.event === 'progress') {
    const status = job.view.status === 'queued' ? 'running' : job.view.status;
    job.view = { ...job.view, status, progress: data };
    render(job.view);
    return null;
  }
  if (typeof data.status !== 'string') return null;
  job.view = data; // queued, started and the terminal events carry the JobView
  render(data);
  return TERMINAL.has(data.status) ? data : null;
}

async function poll(job) {
  setTransport('polling');
  let failures = 0;
  for (;;) {
    try {
      const view = await (await api(jobUrl(job.id), { signal: job.abort.signal })).json();
      failures = 0;
      job.view = view;
      render(view);
      if (TERMINAL.has(view.status)) return view;
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      if (e.status && e.status < 500) throw e; // gone, or not ours: say so
      failures += 1;
      if (failures > 10) throw e;
    }
    await sleep(POLL_MS, job.abort.signal);
  }
}

function finishJob(job, view) {
  if (job.done) return;
  job.done = true;
  if (activeJob === job) activeJob = null;
  sessionStorage.removeItem(JOB_STORAGE);
  els.submit.disabled = false;
  els.submit.textContent = 'Generate';
  els.cancel.disabled = true;
  // The recent jobs list (history.js) listens: it changed.
  document.dispatchEvent(new CustomEvent('magicface:jobend', { detail: { id: job.id } }));
  if (!view) return;
  render(view);
  if (view.status === 'succeeded') {
    showResult(view);
  } else if (view.status === 'failed') {
    const err = view.error || {};
    showError({ message: err.message || 'The job failed.', code: err.code || 'failed' });
  } else if (view.status === 'expired') {
    showError({ message: 'The job expired: its record or result is no longer kept.',
      code: 'expired' });
  }
}

export async function cancelJob() {
  const job = activeJob;
  if (!job) return;
  els.cancel.disabled = true;
  els.cancel.textContent = 'Canceling…';
  try {
    const view = await (await api(jobUrl(job.id, '/cancel'), { method: 'POST' })).json();
    if (job.done) return;
    job.view = view;
    render(job.view);
    if (TERMINAL.has(view.status)) {
      job.abort.abort();
      finishJob(job, view);
    } else {
      els.cancel.textContent = 'Cancel requested';
    }
  } catch (e) {
    if (job.done) return;
    showError(e);
    els.cancel.textContent = 'Cancel';
    els.cancel.disabled = e.code === 'job_finished';
  }
}

export async function resumeJob() {
  const id = sessionStorage.getItem(JOB_STORAGE);
  if (!id) return;
  try {
    const view = await (await api(jobUrl(id))).json();
    startJob(view);
  } catch (_) {
    sessionStorage.removeItem(JOB_STORAGE);
  }
}

