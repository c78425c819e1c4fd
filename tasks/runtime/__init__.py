"""How task code runs: the one way to declare a Prefect task (``declare``), the one way to wait
and retry (``polling``), and progress reporting (``progress``). No services."""
