"""Stage 3, build: Label Studio annotations -> the rows of a dataset version. The plan (parent
version, mode), the export (incremental, or a snapshot), filters, dedup against the parent and
the cluster-aware split, and the figures and pictures a build reports."""
