// MagicFace web page: builds a job (prompt, concepts with reference images and painted
// masks, parameters), submits it to /v1/jobs, follows its progress over server-sent
// events and shows the result. Plain browser JavaScript, no build step.
'use strict';

(() => {
  const KEY_STORAGE = 'magicface.apiKey';
  const JOB_STORAGE = 'magicface.jobId';
  const TERMINAL = new Set(['succeeded', 'failed', 'canceled', 'expired']);
  const STATUS_LABEL = {
    queued: 'Queued',
    running: 'Running',
    cancel_requested: 'Cancel requested',
    succeeded: 'Done',
    failed: 'Failed',
    canceled: 'Canceled',
    expired: 'Expired',
  };
  const STAGE_BOX_PX = 420; // the mask editor fits the photo in a square this size
  const STREAM_MAX_FAILURES = 3; // connections in a row without an event: then poll
  const POLL_MS = 1000;

  const $ = (sel, root = document) => root.querySelector(sel);
  const els = {
    form: $('#job-form'),
    apiKey: $('#api-key'),
    prompt: $('#prompt'),
    concepts: $('#concepts'),
    noConcepts: $('#no-concepts'),
    addConcept: $('#add-concept'),
    template: $('#concept-template'),
    steps: $('#steps'),
    width: $('#width'),
    height: $('#height'),
    seed: $('#seed'),
    guidance: $('#guidance-scale'),
    alpha: $('#alpha'),
    preset: $('#preset'),
    submit: $('#submit'),
    error: $('#error'),
    statusBox: $('#status-box'),
    idleText: $('#idle-text'),
    progress: $('#progress'),
    progressText: $('#progress-text'),
    cancel: $('#cancel'),
    result: $('#result'),
    resultImage: $('#result-image'),
    semanticMap: $('#semantic-map'),
    legend: $('#legend'),
  };

  // ---------------------------------------------------------------------------------
  // Talking to the API
  // ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, code, status) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }

  function authHeaders(extra = {}) {
    const headers = { ...extra };
    const key = els.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async function errorFrom(resp) {
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

  function networkError(e) {
    return new ApiError(`Could not reach the server (${e.message || e}).`, 'network', 0);
  }

  async function api(url, opts = {}) {
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

  const jobUrl = (id, tail = '') => `v1/jobs/${encodeURIComponent(id)}${tail}`;

  function sleep(ms, signal) {
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

  // ---------------------------------------------------------------------------------
  // Server-sent events over fetch (EventSource cannot send an Authorization header)
  // ---------------------------------------------------------------------------------

  class SseParser {
    constructor() {
      this.lastEventId = '';
      this.retryMs = null;
      this.reset();
    }

    reset() { // a new connection: the event being built is dropped, the last id kept
      this.buf = '';
      this.data = [];
      this.type = '';
      this.idBuffer = this.lastEventId;
    }

    // Feed decoded text; returns the events it completed.
    push(text) {
      this.buf += text;
      const events = [];
      for (;;) {
        const cr = this.buf.indexOf('\r');
        const lf = this.buf.indexOf('\n');
        let i;
        if (cr < 0) i = lf;
        else if (lf < 0) i = cr;
        else i = Math.min(cr, lf);
        if (i < 0) break;
        // A CR at the end may be half of a CRLF: wait for the next chunk.
        if (this.buf[i] === '\r' && i === this.buf.length - 1) break;
        const line = this.buf.slice(0, i);
        const skip = this.buf[i] === '\r' && this.buf[i + 1] === '\n' ? 2 : 1;
        this.buf = this.buf.slice(i + skip);
        const ev = this.line(line);
        if (ev) events.push(ev);
      }
      return events;
    }

    line(line) {
      if (line === '') {
        this.lastEventId = this.idBuffer;
        if (this.data.length === 0) {
          this.type = '';
          return null;
        }
        const ev = { id: this.lastEventId, event: this.type || 'message',
          data: this.data.join('\n') };
        this.data = [];
        this.type = '';
        return ev;
      }
      if (line.startsWith(':')) return null; // a comment (keep-alive)
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'data') this.data.push(value);
      else if (field === 'event') this.type = value;
      else if (field === 'id' && !value.includes('\0')) this.idBuffer = value;
      else if (field === 'retry' && /^\d+$/.test(value)) this.retryMs = Number(value);
      return null;
    }
  }

  // ---------------------------------------------------------------------------------
  // Concepts: reference image, mask editor, word
  // ---------------------------------------------------------------------------------

  const concepts = [];
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

  function refreshWordSelects() {
    for (const c of concepts) fillWordSelect(c);
  }

  function renumberConcepts() {
    concepts.forEach((c, i) => {
      $('.concept-title', c.node).textContent = `Concept ${i + 1}`;
      $('.remove-concept', c.node).setAttribute('aria-label', `Remove concept ${i + 1}`);
    });
    els.noConcepts.hidden = concepts.length > 0;
  }

  function addConcept() {
    const n = ++conceptSeq;
    const node = els.template.content.firstElementChild.cloneNode(true);
    for (const el of node.querySelectorAll('[data-id]')) el.id = `concept-${n}-${el.dataset.id}`;
    for (const label of node.querySelectorAll('label[data-for]')) {
      label.htmlFor = `concept-${n}-${label.dataset.for}`;
    }
    for (const radio of node.querySelectorAll('input[type="radio"]')) {
      radio.name = `concept-${n}-tool`;
    }
    const canvas = $('.mask-canvas', node);
    const c = {
      n,
      node,
      word: $('.word-select', node),
      weight: $('.weight-input', node),
      refPrompt: $('.reference-prompt-input', node),
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
      imageFile: null, // the reference file, sent as is
      imageUrl: null,
      imageReady: false, // decoded: the canvas has its natural size
      maskFile: null, // an uploaded mask, drawn onto the canvas once the image is ready
      last: null, // the previous point of the stroke being drawn
      pointerId: null,
    };
    wireConcept(c);
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
    if (c.imageUrl) URL.revokeObjectURL(c.imageUrl);
    c.node.remove();
    renumberConcepts();
    (concepts[Math.min(i, concepts.length - 1)]?.word || els.addConcept).focus();
  }

  function wireConcept(c) {
    $('.remove-concept', c.node).addEventListener('click', () => removeConcept(c));
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
    ctx.strokeStyle = '#ffffff';
    ctx.fillStyle = '#ffffff';
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
      `Mask of ${file.name}: paint the concept white (${w}×${h} pixels)`);
    c.imageReady = true;
    c.editor.hidden = false;
    if (c.maskFile) await applyMaskFile(c, c.maskFile);
    else c.maskNote.textContent = '';
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

  // Draw an uploaded mask onto the canvas (at the photo's size; white where the mask's
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
    for (let i = 0; i < src.length; i += 4) {
      const grey = (src[i] * 299 + src[i + 1] * 587 + src[i + 2] * 114) / 1000;
      const on = (grey * src[i + 3]) / 255 >= 128;
      out.data[i] = 255;
      out.data[i + 1] = 255;
      out.data[i + 2] = 255;
      out.data[i + 3] = on ? 255 : 0;
    }
    c.ctx.putImageData(out, 0, 0);
    const iw = img.naturalWidth;
    const ih = img.naturalHeight;
    c.maskNote.textContent = iw === w && ih === h
      ? `Mask ${file.name} loaded; you can paint over it.`
      : `Mask ${file.name} is ${iw}×${ih}; it was stretched to the image's ${w}×${h}.`;
  }

  function maskIsEmpty(c) {
    const { data } = c.ctx.getImageData(0, 0, c.canvas.width, c.canvas.height);
    for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return false;
    return true;
  }

  // The mask as a PNG at the photo's natural size: white where painted, black elsewhere.
  function exportMask(c) {
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

  // ---------------------------------------------------------------------------------
  // Building and submitting the request
  // ---------------------------------------------------------------------------------

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

  async function buildForm() {
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

  // ---------------------------------------------------------------------------------
  // Showing a job
  // ---------------------------------------------------------------------------------

  let activeJob = null;
  let resultUrls = [];

  function showError(e) {
    const message = typeof e === 'string' ? e : e.message || String(e);
    els.error.textContent = message;
    els.error.dataset.code = (e && e.code) || '';
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = '';
    els.error.dataset.code = '';
    els.error.hidden = true;
  }

  function clearResult() {
    for (const url of resultUrls) URL.revokeObjectURL(url);
    resultUrls = [];
    els.resultImage.removeAttribute('src');
    els.semanticMap.removeAttribute('src');
    els.semanticMap.closest('figure').hidden = false;
    els.legend.replaceChildren();
    els.result.hidden = true;
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

  function startJob(view) {
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

  async function fetchBlobUrl(url) {
    const resp = await api(url); // follows a redirect to a presigned storage URL
    const blob = await resp.blob();
    const objectUrl = URL.createObjectURL(blob);
    resultUrls.push(objectUrl);
    return objectUrl;
  }

  async function showResult(view) {
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

  // ---------------------------------------------------------------------------------
  // Page events
  // ---------------------------------------------------------------------------------

  async function onSubmit(ev) {
    ev.preventDefault();
    if (activeJob) return;
    clearError();
    clearResult();
    let form;
    try {
      form = await buildForm();
    } catch (e) {
      showError(e);
      return;
    }
    els.submit.disabled = true;
    els.submit.textContent = 'Submitting…';
    try {
      const resp = await api('v1/jobs', { method: 'POST', body: form });
      startJob(await resp.json());
    } catch (e) {
      showError(e);
      els.submit.disabled = false;
      els.submit.textContent = 'Generate';
    }
  }

  async function onCancel() {
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

  async function resumeJob() {
    const id = sessionStorage.getItem(JOB_STORAGE);
    if (!id) return;
    try {
      const view = await (await api(jobUrl(id))).json();
      startJob(view);
    } catch (_) {
      sessionStorage.removeItem(JOB_STORAGE);
    }
  }

  els.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || '';
  els.apiKey.addEventListener('input', () => {
    sessionStorage.setItem(KEY_STORAGE, els.apiKey.value);
  });
  els.prompt.addEventListener('input', refreshWordSelects);
  els.addConcept.addEventListener('click', () => addConcept());
  els.form.addEventListener('submit', onSubmit);
  els.cancel.addEventListener('click', onCancel);
  renumberConcepts();
  resumeJob();

  // For scripts and tests: the exported mask of concept `index` (0-based), a PNG Blob.
  window.magicface = {
    maskBlob(index) {
      const c = concepts[index];
      if (!c || !c.imageReady) return Promise.reject(new Error(`concept ${index} has no image`));
      return exportMask(c);
    },
  };
})();
