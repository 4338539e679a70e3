"""Prefect 3 orchestration over the DVC pipeline: `pipeline` and `sweep`, both in
flows/pipeline.py.

The flows run DVC stages as subprocesses, so caching stays DVC's: a stage that `dvc status` calls
up to date is not run, and a second run of an unchanged project does nothing. What Prefect adds is
one task per unit of work (extraction and sampling shards run as concurrent tasks), retries, a
`gpu` tag for a concurrency limit, and deployments to a work pool (prefect.yaml).
"""
