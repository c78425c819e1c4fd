"""A Jepsen-style history of a soak, and a checker independent of the code it checks.

``recorder``: an append-only JSONL history (the driver's operations, with their start and end
times) and an ``Observer`` that polls S3, Label Studio, Prefect and the fine-tuning provider on
their own REST APIs and records what it saw. ``checker``: the invariants of issue #18 as
functions over that history. Neither imports sftflow: the checker shares no code with what it
checks (plain boto3, httpx, pyarrow).
"""
