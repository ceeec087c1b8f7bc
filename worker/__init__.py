"""The MagicFace RQ worker: loads the pipeline once, runs generation jobs."""
