// "Auto mask": the server proposes the mask of the chosen word in the reference photo
// (POST /v1/masks, made by a worker's detector); it lands on the canvas like an
// uploaded mask, so the brush and eraser can correct it before the job is sent.

import { api, sleep } from './api.js';
import { useMaskFile } from './mask_editor.js';

const WAIT_S = 30; // Prefer: wait; a slower proposal is polled

async function proposal(c, word) {
  const fd = new FormData();
  fd.append('image', c.imageFile, c.imageFile.name || 'image');
  fd.append('word', word);
  const ref = c.refPrompt.value.trim();
  if (ref) fd.append('reference_prompt', ref);
  const resp = await api('v1/masks', { method: 'POST', body: fd,
                                       headers: { Prefer: `wait=${WAIT_S}` } });
  let view = await resp.json();
  const until = Date.now() + 60_000;
  while ((view.status === 'queued' || view.status === 'running') && Date.now() < until) {
    await sleep(500);
    view = await (await api(`v1/masks/${encodeURIComponent(view.id)}`)).json();
  }
  return view;
}

async function autoMask(c) {
  const word = c.word.value;
  if (!word) {
    c.maskNote.textContent = 'Choose the word first: the mask is found from it.';
    return;
  }
  c.autoMask.disabled = true;
  c.maskNote.textContent = `Looking for “${word}” in the photo…`;
  try {
    const view = await proposal(c, word);
    if (view.status !== 'succeeded') {
      c.maskNote.textContent = view.error ? view.error.message
        : 'The server did not answer in time; paint the mask instead.';
      return;
    }
    const blob = await (await fetch(view.result.mask)).blob();
    await useMaskFile(c, new File([blob], `auto-${word}.png`, { type: 'image/png' }));
    const r = view.result;
    c.maskNote.textContent = `Proposed from “${word}” (${r.source}, score `
      + `${r.score.toFixed(2)}). Correct it with the brush or eraser if needed.`;
  } catch (e) {
    c.maskNote.textContent = e.message;
  } finally {
    c.autoMask.disabled = false;
  }
}

export function wireAutoMask(c) {
  c.autoMask.addEventListener('click', () => autoMask(c));
}
