"""Stage 4, versions: immutable, content-addressed dataset versions in object storage. The row
types and their Parquet schema, the key layout, manifests, the commit protocol, refs and tags,
locks, readers, pull, gc, and the formats a version is written in (Parquet, chat JSONL, TRL,
Hugging Face)."""
