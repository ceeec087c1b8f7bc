// The job panel's messages and the finished job's result: the image and the semantic
// map are fetched with the key (an <img> cannot send one) and shown as object URLs,
// the image's also behind the download link (a plain link could not send the key).

import { api, jobUrl } from './api.js';
import { els } from './dom.js';
import { clearMarks, fromServer, markFields, problemText } from './problems.js';

let resultUrls = [];

// A message that names a field (the server's, or a check of the page's) also marks
// the concept row or input it is about.
export function showError(e) {
  const message = typeof e === 'string' ? e : e.message || String(e);
  const { text, fields } = fromServer(message, e && e.code);
  els.error.textContent = text;
  els.error.dataset.code = (e && e.code) || '';
  els.error.hidden = false;
  markFields(fields);
}

// The page's own checks: every problem found, one a line, the first one's row in view.
export function showProblems(problems) {
  els.error.textContent = problems.map(problemText).join('\n');
  els.error.dataset.code = 'checked_on_page';
  els.error.hidden = false;
  markFields(problems.map((p) => p.field));
}

export function clearError() {
  els.error.textContent = '';
  els.error.dataset.code = '';
  els.error.hidden = true;
  clearMarks();
}

export function clearResult() {
  for (const url of resultUrls) URL.revokeObjectURL(url);
  resultUrls = [];
  els.resultImage.removeAttribute('src');
  els.semanticMap.removeAttribute('src');
  els.semanticMap.closest('figure').hidden = false;
  els.legend.replaceChildren();
  els.download.removeAttribute('href');
  els.download.hidden = true;
  els.resultId.textContent = '';
  els.resultSeed.textContent = '';
  els.result.hidden = true;
}

// JSON.parse rounds integers past 2^53, and a seed may be up to 2^63 - 1: past that,
// the seed's digits are read from the view's own text.
async function exactSeed(view) {
  const seed = view.reproducibility && view.reproducibility.seed;
  if (seed === null || seed === undefined || Number.isSafeInteger(seed)) return seed;
  try {
    const text = await (await api(jobUrl(view.id))).text();
    const m = /"reproducibility"\s*:\s*\{\s*"seed"\s*:\s*(\d+)/.exec(text);
    return m ? m[1] : seed;
  } catch (_) {
    return seed;
  }
}

async function fetchBlobUrl(url) {
  const resp = await api(url); // follows a redirect to a presigned storage URL
  const blob = await resp.blob();
  const objectUrl = URL.createObjectURL(blob);
  resultUrls.push(objectUrl);
  return objectUrl;
}

export async function showResult(view) {
  const r = view.result;
  if (!r || !r.image_url) {
    showError('The job succeeded but the server gave no result.');
    return;
  }
  els.result.hidden = false;
  els.resultId.textContent = view.id;
  fillLegend(r.semantic_map_legend || []);
  exactSeed(view).then((seed) => {
    if (els.resultId.textContent !== view.id) return; // another result meanwhile
    els.resultSeed.textContent = seed === null || seed === undefined ? 'unknown' : String(seed);
  });
  const mapFigure = els.semanticMap.closest('figure');
  mapFigure.hidden = !r.semantic_map_url;
  const loads = [[els.resultImage, r.image_url, 'image']];
  if (r.semantic_map_url) loads.push([els.semanticMap, r.semantic_map_url, 'semantic map']);
  await Promise.all(loads.map(async ([img, url, what]) => {
    try {
      img.src = await fetchBlobUrl(url);
      if (img === els.resultImage) {
        els.download.href = img.src;
        els.download.download = `magicface-${view.id}.png`;
        els.download.hidden = false;
      }
    } catch (e) {
      showError(`Could not download the ${what}: ${e.message}`);
    }
  }));
}

function fillLegend(items) {
  els.legend.replaceChildren();
  for (const item of items) {
    const li = document.createElement('li');
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.setAttribute('aria-hidden', 'true');
    if (typeof item.color === 'string' && /^#[0-9a-f]{6}$/i.test(item.color)) {
      swatch.style.backgroundColor = item.color;
      li.title = item.color;
    }
    const word = document.createElement('span');
    word.className = 'legend-word';
    word.textContent = String(item.word ?? '');
    li.append(swatch, word);
    els.legend.append(li);
  }
}
