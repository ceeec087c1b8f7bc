// What is wrong with a job, said the same way whether the page found it or the server
// did: the server names a field as the request does ("concepts[1].word"), the page as
// the user sees it ("Concept 2"), so a message gives both, and the row or input it is
// about is marked and scrolled to.

import { els } from './dom.js';
import { concepts } from './form.js';

const INDEXED = /^(concepts|images|masks)\[(\d+)\]((?:\.\w+)*)/;
const PARAM = /^params\.(\w+)/;
// The page's input of each of the server's params (the others have none).
const PARAM_INPUTS = {
  steps: 'steps', seed: 'seed', width: 'width', height: 'height',
  guidance_scale: 'guidance', alpha: 'alpha', preset: 'preset',
};

function paramInput(name) {
  const key = PARAM_INPUTS[name];
  return key ? els[key] : null;
}

// "Width (px)" names the input "Width": the unit is the label's, not the field's.
function inputLabel(input) {
  const label = input.id && document.querySelector(`label[for="${input.id}"]`);
  return label ? label.textContent.replace(/\s*\([^)]*\)\s*$/, '').trim() : input.id;
}

// The page's name of a request field: "Concept 2 (concepts[1].word)", "Steps
// (params.steps)"; a field the page has no name for is named as the server names it.
export function fieldLabel(field) {
  let m = INDEXED.exec(field);
  if (m && m[0] === field) return `Concept ${Number(m[2]) + 1} (${field})`;
  m = PARAM.exec(field);
  const input = m && m[0] === field ? paramInput(m[1]) : null;
  if (input) return `${inputLabel(input)} (${field})`;
  return field;
}

// As the rule book's Problem.text: a predicate ("must be ...") follows the name, a
// statement follows a colon.
export function problemText(p) {
  if (!p.field) return p.message;
  const sep = p.message.startsWith('must ') ? ' ' : ': ';
  return `${fieldLabel(p.field)}${sep}${p.message}`;
}

// A server message that starts with the field it is about, split there; null when it
// names none the page can point at.
function leadingField(message) {
  const m = INDEXED.exec(message) || PARAM.exec(message);
  if (!m) return null;
  const rest = message.slice(m[0].length);
  if (rest !== '' && !rest.startsWith(':') && !rest.startsWith(' ')) return null;
  return { field: m[0], rest };
}

// The server's message in the page's words, and the fields it is about.
export function fromServer(message, code) {
  const lead = leadingField(message);
  if (lead) return { text: `${fieldLabel(lead.field)}${lead.rest}`, fields: [lead.field] };
  if (code === 'image_count_mismatch') { // "images: 1 uploaded for 2 concepts"
    const fields = [];
    concepts.forEach((c, i) => { if (!c.imageFile) fields.push(`images[${i}]`); });
    return { text: message, fields };
  }
  return { text: message, fields: [] };
}

function targetOf(field) {
  let m = INDEXED.exec(field);
  if (m) return concepts[Number(m[2])]?.node || null;
  m = PARAM.exec(field);
  return m ? paramInput(m[1]) : null;
}

export function clearMarks() {
  for (const el of document.querySelectorAll('.has-problem')) {
    el.classList.remove('has-problem');
    el.removeAttribute('aria-invalid');
  }
}

export function markFields(fields) {
  clearMarks();
  let first = null;
  for (const field of fields) {
    const el = targetOf(field);
    if (!el) continue;
    el.classList.add('has-problem');
    if (el.matches('input, select')) el.setAttribute('aria-invalid', 'true');
    const details = el.closest('details');
    if (details) details.open = true; // the advanced parameters, folded away
    first = first || el;
  }
  if (first) first.scrollIntoView({ block: 'center' });
  if (first && first.matches('input, select')) first.focus({ preventScroll: true });
  return first;
}
