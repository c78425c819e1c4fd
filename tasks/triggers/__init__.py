"""Stage 2, triggers: is there enough new annotation work to build? Project counters and the
threshold arithmetic, threshold crossings (one build run at a time per crossing), and incoming
webhooks turned into Prefect events."""
