"""sftflow: human annotations to fine-tuned models, orchestrated by Prefect 3."""

__version__ = "0.1.0"
