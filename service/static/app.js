// MagicFace web page: builds a job (prompt, concepts with reference images and painted
// masks, parameters), submits it to /v1/jobs, follows its progress over server-sent
// events and shows the result. Plain browser JavaScript modules, no build step: this
// entry wires the page's controls to the modules that do the work.

import { api } from './api.js';
import { els } from './dom.js';
import {
  addConcept, buildForm, concepts, refreshWordSelects, renumberConcepts,
} from './form.js';
import { refreshHistory, refreshHistorySoon } from './history.js';
import { checkJob, checkUploadTotal, limitsKnown, loadLimits } from './limits.js';
import { exportMask } from './mask_editor.js';
import { cancelJob, jobInProgress, resumeJob, startJob } from './progress.js';
import { clearError, clearResult, showError, showProblems } from './result.js';

const KEY_STORAGE = 'magicface.apiKey';

async function onSubmit(ev) {
  ev.preventDefault();
  if (jobInProgress()) return;
  clearError();
  clearResult();
  // What the server would refuse is said before the upload, not after it.
  let problems = checkJob();
  if (problems.length) {
    showProblems(problems);
    return;
  }
  let form;
  try {
    form = await buildForm();
  } catch (e) {
    showError(e);
    return;
  }
  problems = checkUploadTotal(form);
  if (problems.length) {
    showProblems(problems);
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

els.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || '';
els.apiKey.addEventListener('input', () => {
  sessionStorage.setItem(KEY_STORAGE, els.apiKey.value);
  refreshHistorySoon();
});
document.addEventListener('magicface:jobend', () => refreshHistory());
els.prompt.addEventListener('input', refreshWordSelects);
els.addConcept.addEventListener('click', () => addConcept());
els.form.addEventListener('submit', onSubmit);
els.cancel.addEventListener('click', cancelJob);
renumberConcepts();
loadLimits();
resumeJob();
refreshHistory();

// For scripts and tests: the exported mask of concept `index` (0-based), a PNG Blob;
// whether the server's limits are known (the page checks a job before uploading it).
window.magicface = {
  limitsKnown,
  maskBlob(index) {
    const c = concepts[index];
    if (!c || !c.imageReady) return Promise.reject(new Error(`concept ${index} has no image`));
    return exportMask(c);
  },
};
