// The key's recent jobs (GET /v1/jobs?limit=10, newest first): listed when a key is
// typed and after each job ends, each with its status and time, a succeeded one with
// a thumbnail of its image; a click shows that job in the panel. Thumbnails are
// fetched with the key (an <img> cannot send one) into object URLs, let go of when
// the list is replaced.

import { api, jobUrl } from './api.js';
import { els } from './dom.js';
import { jobInProgress, startJob, STATUS_LABEL } from './progress.js';
import { clearError, clearResult, showError, showResult } from './result.js';

const LIMIT = 10;
const TYPING_MS = 400; // a key being typed is listed once it rests

let thumbUrls = [];
let listing = 0; // the newest listing's number: an older, slower one is dropped
let typingTimer = null;

function keyTyped() {
  return els.apiKey.value.trim() !== '';
}

function when(iso) {
  const d = iso ? new Date(iso) : null;
  return d && !Number.isNaN(d.getTime()) ? d.toLocaleString() : '';
}

async function showJob(id) {
  let view;
  try {
    view = await (await api(jobUrl(id))).json();
  } catch (e) {
    showError(e);
    return;
  }
  const terminal = ['succeeded', 'failed', 'canceled', 'expired'].includes(view.status);
  if (!terminal) {
    if (!jobInProgress()) startJob(view); // follow it as if just submitted
    return;
  }
  if (jobInProgress()) return; // the job being followed keeps the panel
  clearError();
  clearResult();
  if (view.status === 'succeeded') await showResult(view);
  else showError({ message: view.error?.message || `The job ended ${view.status}.`,
    code: view.error?.code || view.status });
}

function item(view, urls, mine) {
  const li = document.createElement('li');
  li.dataset.id = view.id;
  li.dataset.status = view.status;
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'history-item';
  button.title = `Show job ${view.id}`;
  const thumb = document.createElement('img');
  thumb.className = 'history-thumb';
  thumb.alt = '';
  const status = document.createElement('span');
  status.className = 'history-status';
  status.textContent = STATUS_LABEL[view.status] || view.status;
  const time = document.createElement('time');
  time.dateTime = view.created_at || '';
  time.textContent = when(view.created_at);
  button.append(thumb, status, time);
  button.addEventListener('click', () => showJob(view.id));
  li.append(button);
  const url = view.status === 'succeeded' && view.result && view.result.image_url;
  if (url) {
    api(url).then((r) => r.blob()).then((blob) => {
      const objectUrl = URL.createObjectURL(blob);
      if (listing !== mine) { // replaced meanwhile
        URL.revokeObjectURL(objectUrl);
        return;
      }
      urls.push(objectUrl);
      thumb.src = objectUrl;
    }).catch(() => {
      thumb.alt = 'no thumbnail';
    });
  }
  return li;
}

export async function refreshHistory() {
  clearTimeout(typingTimer);
  const mine = ++listing;
  if (!keyTyped()) {
    // Without a key a keyed server answers 401: not worth a console error per load.
    replaceList([], []);
    els.history.hidden = true;
    return;
  }
  let jobs;
  try {
    jobs = (await (await api(`v1/jobs?limit=${LIMIT}`)).json()).jobs || [];
  } catch (e) {
    if (mine !== listing) return;
    replaceList([], []);
    els.historyNote.textContent = `The recent jobs could not be listed: ${e.message}`;
    els.history.hidden = false;
    return;
  }
  if (mine !== listing) return;
  const urls = [];
  replaceList(jobs.map((v) => item(v, urls, mine)), urls);
  els.historyNote.textContent = jobs.length ? '' : 'No jobs yet with this key.';
  els.history.hidden = false;
}

function replaceList(items, urls) {
  for (const url of thumbUrls) URL.revokeObjectURL(url);
  thumbUrls = urls;
  els.historyList.replaceChildren(...items);
}

export function refreshHistorySoon() {
  clearTimeout(typingTimer);
  typingTimer = setTimeout(refreshHistory, TYPING_MS);
}
