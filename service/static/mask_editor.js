// The mask editor of one concept: the reference photo with a canvas over it at the
// photo's natural size, a brush and an eraser, and masks uploaded as files. The canvas
// keeps paint as opaque colour (its alpha is the mask); exportMask turns it into the
// black-and-white PNG the server wants.

import { $ } from './dom.js';

const STAGE_BOX_PX = 420; // the mask editor fits the photo in a square this size
// The paint's colour on screen: white paint vanished on light photos (a pale face, a
// white wall); a saturated magenta, shown semi-transparent (style.css), stands out on
// both light and dark ones and lets the photo show through.
const PAINT_RGB = [255, 0, 170];
const PAINT = `rgb(${PAINT_RGB.join(', ')})`;

// The editor's part of a concept's record, for the concept's cloned template `node`.
export function maskEditorState(node) {
  const canvas = $('.mask-canvas', node);
  return {
    imageInput: $('.concept-image-input', node),
    maskInput: $('.concept-mask-input', node),
    maskNote: $('.mask-note', node),
    editor: $('.mask-editor', node),
    stage: $('.stage', node),
    preview: $('.concept-preview', node),
    canvas,
    ctx: canvas.getContext('2d', { willReadFrequently: true }),
    eraser: $('.tool-eraser', node),
    brushSize: $('.brush-size', node),
    brushSizeValue: $('.brush-size-value', node),
    autoMask: $('.auto-mask', node),
    imageFile: null, // the reference file, sent as is
    imageUrl: null,
    imageReady: false, // decoded: the canvas has its natural size
    maskFile: null, // an uploaded mask, drawn onto the canvas once the image is ready
    last: null, // the previous point of the stroke being drawn
    pointerId: null,
  };
}

export function wireMaskEditor(c) {
  c.imageInput.addEventListener('change', () => setImage(c, c.imageInput.files[0] || null));
  c.maskInput.addEventListener('change', () => setMaskFile(c, c.maskInput.files[0] || null));
  $('.clear-mask', c.node).addEventListener('click', () => {
    c.ctx.clearRect(0, 0, c.canvas.width, c.canvas.height);
    c.maskFile = null;
    c.maskInput.value = '';
    c.maskNote.textContent = '';
  });
  c.brushSize.addEventListener('input', () => {
    c.brushSizeValue.textContent = c.brushSize.value;
  });

  const canvas = c.canvas;
  canvas.addEventListener('pointerdown', (e) => {
    if (e.button !== 0 || !c.imageReady) return;
    e.preventDefault();
    try {
      canvas.setPointerCapture(e.pointerId);
    } catch (_) {
      // synthetic pointers may not be capturable; drawing works without it
    }
    c.pointerId = e.pointerId;
    const p = toCanvas(c, e);
    paint(c, p, p);
    c.last = p;
  });
  canvas.addEventListener('pointermove', (e) => {
    if (c.last === null || e.pointerId !== c.pointerId) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const ev of events.length ? events : [e]) {
      const p = toCanvas(c, ev);
      paint(c, c.last, p);
      c.last = p;
    }
  });
  const end = (e) => {
    if (e.pointerId !== c.pointerId) return;
    c.last = null;
    c.pointerId = null;
  };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  canvas.addEventListener('lostpointercapture', end);
}

// The concept is being removed: let go of its photo's object URL.
export function disposeMaskEditor(c) {
  if (c.imageUrl) URL.revokeObjectURL(c.imageUrl);
}

function toCanvas(c, e) {
  const rect = c.canvas.getBoundingClientRect();
  return {
    x: ((e.clientX - rect.left) * c.canvas.width) / rect.width,
    y: ((e.clientY - rect.top) * c.canvas.height) / rect.height,
  };
}

// One segment of a stroke, in the canvas's (the photo's natural) pixels; the brush
// size is in on-screen pixels, so it looks the same whatever the photo's size.
function paint(c, a, b) {
  const rect = c.canvas.getBoundingClientRect();
  const width = (Number(c.brushSize.value) * c.canvas.width) / Math.max(rect.width, 1);
  const ctx = c.ctx;
  ctx.save();
  ctx.globalCompositeOperation = c.eraser.checked ? 'destination-out' : 'source-over';
  ctx.strokeStyle = PAINT;
  ctx.fillStyle = PAINT;
  ctx.lineWidth = width;
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  ctx.beginPath();
  ctx.moveTo(a.x, a.y);
  ctx.lineTo(b.x, b.y);
  ctx.stroke();
  ctx.beginPath();
  ctx.arc(b.x, b.y, width / 2, 0, Math.PI * 2);
  ctx.fill();
  ctx.restore();
}

function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error('the browser cannot decode this file'));
    img.src = url;
  });
}

async function setImage(c, file) {
  if (c.imageUrl) URL.revokeObjectURL(c.imageUrl);
  c.imageUrl = null;
  c.imageFile = file;
  c.imageReady = false;
  c.editor.hidden = true;
  c.ctx.clearRect(0, 0, c.canvas.width, c.canvas.height);
  if (!file) return;
  const url = URL.createObjectURL(file);
  c.imageUrl = url;
  try {
    await loadImage(c.preview, url);
  } catch (e) {
    if (c.imageFile !== file) return;
    // Still sent: the server says what is wrong with it.
    c.maskNote.textContent = `This image cannot be shown here (${e.message}), so no `
      + 'mask can be painted on it; upload a mask file instead.';
    return;
  }
  if (c.imageFile !== file) return; // another file was chosen meanwhile
  const w = c.preview.naturalWidth;
  const h = c.preview.naturalHeight;
  c.canvas.width = w; // also clears it
  c.canvas.height = h;
  const scale = Math.min(STAGE_BOX_PX / w, STAGE_BOX_PX / h);
  c.stage.style.width = `${Math.max(1, Math.round(w * scale))}px`;
  c.stage.style.aspectRatio = `${w} / ${h}`;
  c.preview.alt = `Reference image ${file.name} (${w}×${h})`;
  c.canvas.setAttribute('aria-label',
    `Mask of ${file.name}: paint over the concept (${w}×${h} pixels)`);
  c.imageReady = true;
  c.editor.hidden = false;
  if (c.maskFile) await applyMaskFile(c, c.maskFile);
  else c.maskNote.textContent = '';
}

// A mask from elsewhere (an upload, the server's proposal) onto the canvas, where the
// brush can correct it.
export async function useMaskFile(c, file) {
  return setMaskFile(c, file);
}

async function setMaskFile(c, file) {
  c.maskFile = file;
  if (!file) return;
  if (!c.imageReady) {
    c.maskNote.textContent = c.imageFile
      ? 'This mask will be used once the reference image is shown.'
      : 'Choose the reference image too: the mask is applied to it.';
    return;
  }
  await applyMaskFile(c, file);
}

// Draw an uploaded mask onto the canvas (at the photo's size; painted where the mask's
// grey level, times its alpha, is at least 50%, as the server thresholds it).
async function applyMaskFile(c, file) {
  const url = URL.createObjectURL(file);
  const img = new Image();
  try {
    await loadImage(img, url);
  } catch (e) {
    c.maskNote.textContent = `The mask file cannot be read (${e.message}).`;
    c.maskFile = null;
    return;
  } finally {
    URL.revokeObjectURL(url);
  }
  if (c.maskFile !== file || !c.imageReady) return;
  const w = c.canvas.width;
  const h = c.canvas.height;
  const tmp = document.createElement('canvas');
  tmp.width = w;
  tmp.height = h;
  const tctx = tmp.getContext('2d', { willReadFrequently: true });
  tctx.drawImage(img, 0, 0, w, h);
  const src = tctx.getImageData(0, 0, w, h).data;
  const out = c.ctx.createImageData(w, h);
  const [r, g, b] = PAINT_RGB;
  for (let i = 0; i < src.length; i += 4) {
    const grey = (src[i] * 299 + src[i + 1] * 587 + src[i + 2] * 114) / 1000;
    const on = (grey * src[i + 3]) / 255 >= 128;
    out.data[i] = r;
    out.data[i + 1] = g;
    out.data[i + 2] = b;
    out.data[i + 3] = on ? 255 : 0;
  }
  c.ctx.putImageData(out, 0, 0);
  const iw = img.naturalWidth;
  const ih = img.naturalHeight;
  c.maskNote.textContent = iw === w && ih === h
    ? `Mask ${file.name} loaded; you can paint over it.`
    : `Mask ${file.name} is ${iw}×${ih}; it was stretched to the image's ${w}×${h}.`;
}

export function maskIsEmpty(c) {
  const { data } = c.ctx.getImageData(0, 0, c.canvas.width, c.canvas.height);
  for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return false;
  return true;
}

// The mask as a PNG at the photo's natural size: white where painted, black elsewhere.
export function exportMask(c) {
  const w = c.canvas.width;
  const h = c.canvas.height;
  const src = c.ctx.getImageData(0, 0, w, h).data;
  const out = new ImageData(w, h);
  for (let i = 0; i < src.length; i += 4) {
    const v = src[i + 3] >= 128 ? 255 : 0;
    out.data[i] = v;
    out.data[i + 1] = v;
    out.data[i + 2] = v;
    out.data[i + 3] = 255;
  }
  const off = document.createElement('canvas');
  off.width = w;
  off.height = h;
  off.getContext('2d').putImageData(out, 0, 0);
  return new Promise((resolve, reject) => {
    off.toBlob((blob) => (blob ? resolve(blob)
      : reject(new Error('the mask could not be encoded'))), 'image/png');
  });
}
