"""The work, one folder per stage: ``ingest`` (prompt files into Label Studio), ``triggers``
(is there enough new work?), ``build`` (annotations into the rows of a version), ``versions``
(immutable versions in object storage), ``finetune`` (a model from a version), ``drafts`` (the
model's drafts back in Label Studio). ``dedup`` is the near-duplicate algorithm both ingest and
build use; ``adapters`` are the thin clients of S3, Label Studio and Prefect; ``runtime`` is how
task code runs (declaring tasks, waiting and retrying, progress). See docs/architecture.md."""
