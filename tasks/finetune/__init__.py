"""Fine-tuning: backends (trl, openai), training code, lineage, gates, chat JSONL checks."""
