"""Worker job logic in-process: out-of-memory and bad input end in defined failed
states and the worker keeps serving; a canceled flag stops before any step."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from service import jobs, keys
from service.settings import Settings
from service.storage import LocalStorage, StorageError, input_key, request_key
from worker.worker import MagicFaceWorker

from ..helpers.examples import trio_job


class OOMOnce:
    """The real tiny pipeline, except that its first generate runs out of memory."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")
        return self.pipe.generate(*args, **kwargs)


def submit(storage, queue, prompt=None, concepts=None, steps=2):
    job = trio_job(2)
    job_id = jobs.new_job_id()
    record = {"prompt": prompt or job["prompt"], "concepts": concepts or job["concepts"],
              "params": {"steps": steps, "guidance_scale": 7.5, "alpha": 0.4, "seed": 1,
                         "negative_prompt": "", "width": 128, "height": 128},
              "masks": True}
    storage.put(request_key(job_id), json.dumps(record).encode())
    for i, (img, m) in enumerate(zip(job["images"], job["masks"], strict=True)):
        storage.put(input_key(job_id, "image", i), open(img, "rb").read())
        storage.put(input_key(job_id, "mask", i), open(m, "rb").read())
    return jobs.enqueue(queue, job_id, steps, 60, 600)


def describe(job, queue) -> dict:
    return jobs.describe(job, queue).model_dump(mode="json")


def run_burst(rt, queue):
    w = MagicFaceWorker([queue], settings=rt.settings, connection=rt.redis, model="tiny")
    w.work(burst=True, with_scheduler=False)


def test_out_of_memory_fails_the_job_and_the_worker_keeps_serving(runtime):
    rt, queue = runtime
    rt.pipe = OOMOnce(rt.pipe)
    first = submit(rt.storage, queue)
    second = submit(rt.storage, queue)
    run_burst(rt, queue)
    a, b = describe(first, queue), describe(second, queue)
    assert a["status"] == "failed" and a["error"]["code"] == "out_of_memory"
    assert b["status"] == "succeeded", b
    assert rt.storage.exists(f"jobs/{second.id}/output/image.png")
    assert not rt.storage.exists(f"jobs/{first.id}/output/image.png")


def test_word_the_tokenizer_cannot_find_is_invalid_input(runtime):
    rt, queue = runtime
    job = submit(rt.storage, queue, concepts=[{"word": "scarf"}, {"word": "hat"}])
    run_burst(rt, queue)
    view = describe(job, queue)
    assert view["status"] == "failed" and view["error"]["code"] == "invalid_input"
    assert "scarf" in view["error"]["message"]


def test_missing_inputs_are_a_storage_error(runtime):
    rt, queue = runtime
    job = submit(rt.storage, queue)
    rt.storage.delete_prefix(f"jobs/{job.id}/input")
    run_burst(rt, queue)
    view = describe(job, queue)
    assert view["status"] == "failed" and view["error"]["code"] == "storage_error"


class MapUploadFails(LocalStorage):
    """Local storage whose semantic-map uploads fail (a storage outage mid-result)."""

    def put(self, key, data, content_type="application/octet-stream"):
        if key.endswith("/semantic_map.png"):
            raise StorageError("connection reset")
        super().put(key, data, content_type)


def test_a_failed_result_upload_leaves_no_partial_outputs(runtime, tmp_path):
    rt, queue = runtime
    rt.storage = MapUploadFails(tmp_path)
    job = submit(rt.storage, queue)
    run_burst(rt, queue)
    view = describe(job, queue)
    assert view["status"] == "failed" and view["error"]["code"] == "storage_error"
    # The storage's own words stay in the worker's log, not in the client's message.
    assert "connection reset" not in view["error"]["message"]
    # The image went up before the map failed; the failed job must not keep it (nor,
    # the job having ended, its uploads).
    assert not rt.storage.exists(f"jobs/{job.id}/output/image.png")
    assert not rt.storage.exists(input_key(job.id, "image", 0))


def test_cancel_flag_set_before_start(runtime):
    rt, queue = runtime
    job = submit(rt.storage, queue)
    rt.redis.set(keys.CANCEL_KEY.format(job.id), "1")
    run_burst(rt, queue)
    view = describe(job, queue)
    assert view["status"] == "canceled" and view["progress"]["step"] == 0


def test_worker_settings_choose_the_fast_path_options():
    from worker.__main__ import load_pipeline

    plain = load_pipeline(Settings(magicface_model="tiny", device="cpu"))
    assert plain.fold_attention_bias and not plain.is_compiled
    assert plain.kv_cache is not None
    tuned = load_pipeline(Settings(magicface_model="tiny", device="cpu",
                                   fold_attention_bias=False, torch_compile=True,
                                   fuse_qkv_projections=True))
    assert not tuned.fold_attention_bias and tuned.is_compiled
    assert any(getattr(m, "fused_projections", False) for m in tuned.unet.modules())
    assert not any(getattr(m, "fused_projections", False) for m in plain.unet.modules())


class InternalBug:
    """A pipeline whose generate fails with a plain ValueError (an internal shape check,
    say): not the client's fault."""

    def generate(self, *args, **kwargs):
        raise ValueError("reference 0: 64 keys but a mask of 256")


def test_only_the_librarys_input_errors_are_invalid_input(runtime):
    rt, queue = runtime
    rt.pipe = InternalBug()
    job = submit(rt.storage, queue)
    run_burst(rt, queue)
    view = describe(job, queue)
    assert view["status"] == "failed" and view["error"]["code"] == "internal_error"
    assert "keys but a mask" not in view["error"]["message"]


class FlakyStorage(LocalStorage):
    """Local storage that refuses every read and write for its first `outage` seconds
    (a storage service restarting)."""

    def __init__(self, root, outage: float):
        super().__init__(root)
        self.until = time.monotonic() + outage

    def _check(self):
        if time.monotonic() < self.until:
            raise StorageError("connection refused")

    def get(self, key):
        self._check()
        return super().get(key)

    def put(self, key, data, content_type="application/octet-stream"):
        self._check()
        super().put(key, data, content_type)


def test_a_short_storage_outage_is_waited_out(runtime, tmp_path):
    rt, queue = runtime
    rt.settings = rt.settings.model_copy(update={"storage_retry_s": 10})
    job = submit(rt.storage, queue)
    rt.storage = FlakyStorage(rt.storage.root, outage=2.0)
    run_burst(rt, queue)
    view = describe(job, queue)
    assert view["status"] == "succeeded", view
    assert rt.storage.exists(f"jobs/{job.id}/output/image.png")


def test_an_outage_longer_than_the_retry_fails_with_storage_error(runtime):
    rt, queue = runtime
    job = submit(rt.storage, queue)
    rt.storage = FlakyStorage(rt.storage.root, outage=60.0)  # retry window: 2 s
    run_burst(rt, queue)
    view = describe(job, queue)
    assert view["status"] == "failed" and view["error"]["code"] == "storage_error"


@pytest.mark.parametrize("keep", [False, True])
def test_uploads_go_when_the_job_ends_unless_kept(runtime, keep):
    rt, queue = runtime
    rt.settings = rt.settings.model_copy(update={"keep_inputs": keep})
    job = submit(rt.storage, queue)
    run_burst(rt, queue)
    assert describe(job, queue)["status"] == "succeeded"
    assert rt.storage.exists(f"jobs/{job.id}/output/image.png")
    assert rt.storage.exists(input_key(job.id, "image", 0)) == keep
    assert rt.storage.exists(request_key(job.id)) == keep


def test_the_sweeper_deletes_what_is_due_and_orphans_past_their_grace(runtime):
    from service.jobs import events
    from service.keys import RETENTION_KEY
    from worker.sweeper import sweep_due, sweep_orphans

    rt, queue = runtime
    kept = submit(rt.storage, queue)  # has a record
    expired, young = "e" * 32, "f" * 32
    rt.storage.put(f"jobs/{expired}/output/image.png", b"x")  # its record is gone
    rt.storage.put(f"jobs/{young}/input/image_0", b"x")  # a job being created right now
    old = time.time() - 120
    os.utime(rt.storage.root / f"jobs/{expired}/output/image.png", (old, old))
    assert sweep_orphans(rt.storage, rt.redis, grace_s=60) == [expired]
    ages = rt.storage.job_ages()
    assert kept.id in ages and young in ages and expired not in ages
    # A job that ended is indexed; once due, all of it goes, and only then.
    run_burst(rt, queue)
    assert describe(kept, queue)["status"] == "succeeded"
    due_at = rt.redis.zscore(RETENTION_KEY, f"{kept.id}:public")
    assert due_at is not None and due_at > time.time()
    assert sweep_due(rt.storage, rt.redis) == []
    assert rt.storage.exists(f"jobs/{kept.id}/output/image.png")
    assert sweep_due(rt.storage, rt.redis, now=due_at + 1) == [kept.id]
    assert not rt.storage.job_ages().get(kept.id)
    assert not rt.redis.exists(f"rq:job:{kept.id}", events.events_key(kept.id))
    assert rt.redis.zcard(RETENTION_KEY) == 0


def tiny_safety_checker(folder, threshold: float):
    """A random-weight StableDiffusionSafetyChecker from a config, saved as an SD
    checkpoint keeps it; `threshold` below -1 flags every image, above 1 none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    cfg = CLIPConfig(vision_config={"hidden_size": 16, "intermediate_size": 32,
                                    "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "image_size": 32, "patch_size": 8},
                     text_config={"hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2},
                     projection_dim=768)
    model = StableDiffusionSafetyChecker(cfg)
    with torch.no_grad():
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(threshold)
    model.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(folder / "feature_extractor")
    return folder


@pytest.mark.parametrize("mode,threshold,status", [("block", -10.0, "failed"),
                                                   ("warn", -10.0, "succeeded"),
                                                   ("block", 10.0, "succeeded")])
def test_the_safety_checker_warns_or_blocks(runtime, tmp_path, mode, threshold, status):
    import logging

    from magicface_core.safety import SafetyChecker, find_safety_checker
    from worker.__main__ import load_safety_checker

    rt, queue = runtime
    folder = tiny_safety_checker(tmp_path / "checkpoint", threshold)
    assert find_safety_checker(str(folder)) == str(folder)
    settings = rt.settings.model_copy(update={"safety_checker": mode,
                                              "safety_checker_model": str(folder)})
    rt.settings = settings
    rt.safety = load_safety_checker(settings, "cpu", logging.getLogger("test"))
    assert isinstance(rt.safety, SafetyChecker)
    job = submit(rt.storage, queue)
    run_burst(rt, queue)
    view = describe(job, queue)
    assert view["status"] == status, view
    stored = rt.storage.exists(f"jobs/{job.id}/output/image.png")
    if status == "failed":
        assert view["error"]["code"] == "unsafe_content" and not stored
    else:
        assert stored
        job.refresh()
        assert job.meta.get("flagged", False) is (mode == "warn")


def test_no_checker_weights_means_no_checker(runtime):
    import logging

    from worker.__main__ import load_safety_checker

    rt, _ = runtime
    settings = rt.settings.model_copy(update={"safety_checker": "block"})
    assert load_safety_checker(settings, "cpu", logging.getLogger("test")) is None


def test_a_job_named_as_a_wheel_install_names_it_runs_here(runtime, monkeypatch):
    """A gateway installed from the wheel queues `magicface_server.worker.tasks.generate`;
    a worker from a checkout (or the image) runs it all the same."""
    rt, queue = runtime
    monkeypatch.setattr(jobs.submit, "JOB_FUNC", "magicface_server.worker.tasks.generate")
    job = submit(rt.storage, queue)
    assert job.func_name == "magicface_server.worker.tasks.generate"
    run_burst(rt, queue)
    assert describe(job, queue)["status"] == "succeeded"


def test_a_job_naming_another_function_fails_without_running_it(runtime, tmp_path):
    """Whatever sits in the queue, the worker runs only its own task."""
    rt, queue = runtime
    victim = tmp_path / "keep.txt"
    victim.write_text("still here")
    job = queue.enqueue_call("os.remove", args=(str(victim),), job_id=jobs.new_job_id())
    run_burst(rt, queue)
    job.refresh()
    assert job.get_status() == "failed"
    assert "is not this worker's task" in (job.latest_result().exc_string or "")
    assert victim.read_text() == "still here"
