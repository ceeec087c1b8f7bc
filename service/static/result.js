// The job panel's messages and the finished job's result: the image and the semantic
// map are fetched with the key (an <img> cannot send one) and shown as object URLs.

import { api } from './api.js';
import { els } from './dom.js';

let resultUrls = [];

export function showError(e) {
  const message = typeof e === 'string' ? e : e.message || String(e);
  els.error.textContent = message;
  els.error.dataset.code = (e && e.code) || '';
  els.error.hidden = false;
}

export function clearError() {
  els.error.textContent = '';
  els.error.dataset.code = '';
  els.error.hidden = true;
}

export function clearResult() {
  for (const url of resultUrls) URL.revokeObjectURL(url);
  resultUrls = [];
  els.resultImage.removeAttribute('src');
  els.semanticMap.removeAttribute('src');
  els.semanticMap.closest('figure').hidden = false;
  els.legend.replaceChildren();
  els.result.hidden = true;
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
  fillLegend(r.semantic_map_legend || []);
  const mapFigure = els.semanticMap.closest('figure');
  mapFigure.hidden = !r.semantic_map_url;
  const loads = [[els.resultImage, r.image_url, 'image']];
  if (r.semantic_map_url) loads.push([els.semanticMap, r.semantic_map_url, 'semantic map']);
  await Promise.all(loads.map(async ([img, url, what]) => {
    try {
      img.src = await fetchBlobUrl(url);
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
