// The form: the concept rows (a word of the prompt, a weight, a reference photo with
// its mask) and the multipart request built from them and the parameters.

import { wireAutoMask } from './auto_mask.js';
import { $, els } from './dom.js';
import {
  disposeMaskEditor, exportMask, maskEditorState, maskIsEmpty, wireMaskEditor,
} from './mask_editor.js';

export const concepts = [];
let conceptSeq = 0;

// The prompt's words, as the server matches them (letters, digits, underscore),
// first spelling of each, in order.
function promptWords() {
  const seen = new Set();
  const words = [];
  for (const m of els.prompt.value.matchAll(/[\p{L}\p{N}_]+/gu)) {
    const key = m[0].toLowerCase();
    if (!seen.has(key)) {
      seen.add(key);
      words.push(m[0]);
    }
  }
  return words;
}

function fillWordSelect(c) {
  const select = c.word;
  const current = select.value;
  const words = promptWords();
  select.replaceChildren();
  const placeholder = new Option(words.length ? 'Choose a word' : 'Type the prompt first', '');
  select.append(placeholder);
  let found = false;
  for (const w of words) {
    const opt = new Option(w, w);
    if (current && w.toLowerCase() === current.toLowerCase()) {
      opt.selected = true;
      found = true;
    }
    select.append(opt);
  }
  if (current && !found) {
    // Keep the user's choice rather than silently changing it; say it is stale.
    const opt = new Option(`${current} (not in the prompt)`, current);
    opt.selected = true;
    select.append(opt);
  }
  if (!current) placeholder.selected = true;
}

export function refreshWordSelects() {
  for (const c of concepts) fillWordSelect(c);
}

export function renumberConcepts() {
  concepts.forEach((c, i) => {
    $('.concept-title', c.node).textContent = `Concept ${i + 1}`;
    $('.remove-concept', c.node).setAttribute('aria-label', `Remove concept ${i + 1}`);
  });
  els.noConcepts.hidden = concepts.length > 0;
}

export function addConcept() {
  const n = ++conceptSeq;
  const node = els.template.content.firstElementChild.cloneNode(true);
  for (const el of node.querySelectorAll('[data-id]')) el.id = `concept-${n}-${el.dataset.id}`;
  for (const label of node.querySelectorAll('label[data-for]')) {
    label.htmlFor = `concept-${n}-${label.dataset.for}`;
  }
  for (const radio of node.querySelectorAll('input[type="radio"]')) {
    radio.name = `concept-${n}-tool`;
  }
  const c = {
    n,
    node,
    word: $('.word-select', node),
    weight: $('.weight-input', node),
    refPrompt: $('.reference-prompt-input', node),
    ...maskEditorState(node),
  };
  $('.remove-concept', node).addEventListener('click', () => removeConcept(c));
  wireMaskEditor(c);
  wireAutoMask(c);
  els.concepts.append(node);
  concepts.push(c);
  fillWordSelect(c);
  renumberConcepts();
  c.word.focus();
  return c;
}

function removeConcept(c) {
  const i = concepts.indexOf(c);
  if (i < 0) return;
  concepts.splice(i, 1);
  disposeMaskEditor(c);
  c.node.remove();
  renumberConcepts();
  (concepts[Math.min(i, concepts.length - 1)]?.word || els.addConcept).focus();
}

class FormProblem extends Error {}

// A number field's value as JSON text, or undefined when empty. Integers keep their
// digits exactly (a seed may be larger than JavaScript numbers hold).
function numberJson(input, label) {
  if (input.validity.badInput) throw new FormProblem(`${label}: not a number.`);
  const v = input.value.trim();
  if (v === '') return undefined;
  if (/^-?\d+$/.test(v)) return v.replace(/^(-?)0+(?=\d)/, '$1');
  const num = Number(v);
  if (!Number.isFinite(num)) throw new FormProblem(`${label}: not a number.`);
  return JSON.stringify(num);
}

function objectJson(entries) {
  const parts = entries.filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${JSON.stringify(k)}:${v}`);
  return `{${parts.join(',')}}`;
}

export async function buildForm() {
  const fd = new FormData();
  fd.append('prompt', els.prompt.value);
  const specs = concepts.map((c, i) => {
    const entries = [['word', JSON.stringify(c.word.value)],
      ['weight', numberJson(c.weight, `Concept ${i + 1} weight`)]];
    const ref = c.refPrompt.value.trim();
    if (ref) entries.push(['reference_prompt', JSON.stringify(ref)]);
    return objectJson(entries);
  });
  fd.append('concepts', `[${specs.join(',')}]`);
  for (const c of concepts) {
    if (c.imageFile) fd.append('images', c.imageFile, c.imageFile.name || 'image');
  }
  // Masks: none when nothing is painted or uploaded (the server may then make them
  // itself, or say that they are required); otherwise one per image.
  const withImage = concepts.filter((c) => c.imageFile);
  const hasMask = (c) => (c.imageReady ? !maskIsEmpty(c) : c.maskFile !== null);
  if (withImage.some(hasMask)) {
    for (const c of withImage) {
      const n = concepts.indexOf(c) + 1;
      if (!hasMask(c)) {
        throw new FormProblem(`Concept ${n}: its mask is empty. Paint the part of the `
          + 'reference image that is the concept, or upload a mask.');
      }
      const blob = c.imageReady ? await exportMask(c) : c.maskFile;
      fd.append('masks', blob, `mask-${n}.png`);
    }
  }
  const params = objectJson([
    ['steps', numberJson(els.steps, 'Steps')],
    ['width', numberJson(els.width, 'Width')],
    ['height', numberJson(els.height, 'Height')],
    ['seed', numberJson(els.seed, 'Seed')],
    ['guidance_scale', numberJson(els.guidance, 'Guidance scale')],
    ['alpha', numberJson(els.alpha, 'Alpha')],
    ['preset', els.preset.value ? JSON.stringify(els.preset.value) : undefined],
  ]);
  if (params !== '{}') fd.append('params', params);
  return fd;
}
