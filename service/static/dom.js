// The page's elements, looked up once and shared by the modules. Module scripts run
// after the document is parsed (like a deferred script), so they all exist by then.

export const $ = (sel, root = document) => root.querySelector(sel);
export const els = {
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
