// The job checked against the server's limits (GET /v1/limits, public) before anything
// is uploaded: what the server would refuse only after the upload (an 11 s one ending
// in 413 for a big photo) is said at once. The checks follow the server's order and
// its wording (the rule book, magicface_core/rules.py, and the gateway's validation),
// so the page and the server read alike. Without the limits (an older server, the
// network) nothing is checked here: the server still checks it all.

import { els } from './dom.js';
import { concepts } from './form.js';

let limits = null;

export async function loadLimits() {
  try {
    const resp = await fetch('v1/limits', { cache: 'no-store' });
    if (resp.ok) limits = await resp.json();
  } catch (_) {
    limits = null;
  }
}

export const limitsKnown = () => limits !== null;

// Python's {:g}: six significant digits.
const g = (v) => String(Number(Number(v).toPrecision(6)));
const chars = (s) => [...s].length; // code points, as Python's len

function describe(lim) {
  return `${lim.min_exclusive ? '(' : '['}${g(lim.min)}, ${g(lim.max)}]`;
}

function textProblem(value, field, most, required) {
  if (required && !value.trim()) return { field, message: 'must be a non-empty string' };
  const n = chars(value);
  if (most && n > most) return { field, message: `must be at most ${most} characters, got ${n}` };
  return null;
}

const normalizeWord = (w) => w.toLowerCase().split(/\s+/).filter(Boolean).join(' ');

// As the rule book's word_in_prompt: the word (or phrase) standing alone in the
// prompt, ignoring case and the spacing between words.
export function wordInPrompt(word, prompt) {
  const esc = (w) => w.replace(/[\\^$.*+?()[\]{}|/]/g, '\\$&');
  const body = word.trim().split(/\s+/).map(esc).join('\\s+');
  return new RegExp(`(?<![\\p{L}\\p{N}_])${body}(?![\\p{L}\\p{N}_])`, 'iu').test(prompt);
}

function conceptProblems(prompt) {
  const most = limits.concepts.max;
  const least = limits.concepts.min;
  const n = concepts.length;
  if (n > most) {
    return [{ field: 'concepts', message: `too many concepts: at most ${most}, got ${n}` }];
  }
  if (n < least) {
    return [{ field: 'concepts', message: `at least ${least} concept is needed, got ${n}` }];
  }
  const out = [];
  const seen = new Set();
  concepts.forEach((c, i) => {
    const field = `concepts[${i}].word`;
    const word = c.word.value;
    const bad = textProblem(word, field, limits.text?.word, true);
    if (bad) {
      out.push(bad);
    } else {
      const key = normalizeWord(word);
      if (seen.has(key)) {
        out.push({ field, message: `the word '${word}' is used by more than one concept` });
      }
      seen.add(key);
      if (!wordInPrompt(word, prompt)) {
        out.push({ field, message: `concept word '${word}' does not occur in the prompt` });
      }
    }
    const weight = c.weight.value.trim();
    const lim = limits.concept?.weight;
    if (lim && weight !== '' && !c.weight.validity.badInput && Number.isFinite(Number(weight))) {
      const v = Number(weight);
      const low = lim.min_exclusive ? v > lim.min : v >= lim.min;
      if (!low || v > lim.max) {
        out.push({ field: `concepts[${i}].weight`,
          message: `must be in ${describe(lim)}, got ${g(v)}` });
      }
    }
    const ref = textProblem(c.refPrompt.value.trim(), `concepts[${i}].reference_prompt`,
      limits.text?.reference_prompt, false);
    if (ref) out.push(ref);
  });
  return out;
}

// The server's params in its schema's order, with the page's input of each; the
// messages are its schema validator's (multiple_of, then the low bound, then the high).
const PARAMS = [['steps', 'steps', true], ['guidance_scale', 'guidance', false],
  ['alpha', 'alpha', false], ['seed', 'seed', true], ['width', 'width', true],
  ['height', 'height', true]];

function paramProblems() {
  const out = [];
  for (const [name, key, integer] of PARAMS) {
    const lim = limits.params?.[name];
    const input = els[key];
    const raw = input.value.trim();
    if (!lim || raw === '' || input.validity.badInput) continue; // the form says so
    const v = Number(raw);
    if (!Number.isFinite(v)) continue;
    const field = `params.${name}`;
    const say = (message) => out.push({ field, message });
    if (integer && !Number.isInteger(v)) say('Input should be a valid integer');
    else if (lim.multiple_of && v % lim.multiple_of !== 0) {
      say(`Input should be a multiple of ${lim.multiple_of}`);
    } else if (lim.min_exclusive ? !(v > lim.min) : !(v >= lim.min)) {
      say(`Input should be greater than ${lim.min_exclusive ? '' : 'or equal to '}${lim.min}`);
    } else if (Number.isSafeInteger(lim.max) && v > lim.max) {
      // A bound past 2^53 (the seed's) was rounded by JSON.parse: the server checks it.
      say(`Input should be less than or equal to ${lim.max}`);
    }
  }
  return out;
}

function fileProblems() {
  const out = [];
  const img = limits.image || {};
  concepts.forEach((c, i) => {
    if (!c.imageFile) return; // the server counts the images (and says so first)
    const field = `images[${i}]`;
    if (img.max_bytes && c.imageFile.size > img.max_bytes) {
      out.push({ field,
        message: `${c.imageFile.size} bytes exceeds the ${img.max_bytes}-byte limit` });
      return;
    }
    const w = c.preview.naturalWidth;
    const h = c.preview.naturalHeight;
    if (c.imageReady && img.max_pixels && w * h > img.max_pixels) {
      out.push({ field, message: `${w}x${h} exceeds the ${img.max_pixels}-pixel limit` });
    }
  });
  concepts.forEach((c, i) => { // an uploaded mask goes as is while its photo is not shown
    if (!c.imageReady && c.maskFile && img.max_bytes && c.maskFile.size > img.max_bytes) {
      out.push({ field: `masks[${i}]`,
        message: `${c.maskFile.size} bytes exceeds the ${img.max_bytes}-byte limit` });
    }
  });
  return out;
}

// Every problem the server would find in the job's text, numbers and file sizes
// ([] also when the limits are unknown). No mask is required: the server may propose
// them, and says so itself when it cannot.
export function checkJob() {
  if (!limits) return [];
  const prompt = els.prompt.value;
  const bad = textProblem(prompt, 'prompt', limits.text?.prompt, true);
  if (bad) return [bad];
  const found = conceptProblems(prompt);
  if (found.length && found[0].field === 'concepts') return found;
  return [...found, ...paramProblems(), ...fileProblems()];
}

// The request's uploads together, against max_request_bytes (the server's first check).
export function checkUploadTotal(fd) {
  const most = limits && limits.max_request_bytes;
  if (!most) return [];
  let total = 0;
  for (const v of fd.values()) if (v instanceof Blob) total += v.size;
  if (total <= most) return [];
  return [{ field: '', message: `uploads total ${total} bytes, over the ${most}-byte limit` }];
}
