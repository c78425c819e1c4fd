"""Stage 1, ingest: prompt files in S3 -> tasks in a Label Studio project, exactly once. Every
record ends imported, duplicate or quarantined with a reason; the ledger in the bucket says
which, and the project's signature index stops near-duplicate prompts."""
