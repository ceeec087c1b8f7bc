"""One module per resource: `jobs` (/v1/jobs...) and `probes` (health, readiness, metrics)."""
