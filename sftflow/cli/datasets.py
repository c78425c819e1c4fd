"""``sftflow build`` and ``sftflow datasets list|show|diff|pull|tag|gc``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from sftflow.cli._app import JsonOption, app, console, console_err, parse_params, print_json
from sftflow.core.errors import ConfigError, SftflowError
from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.clients import Clients, prefect_api

datasets_app = typer.Typer(help="Dataset versions in the bucket: list, show, diff, pull, tag, gc.",
                           no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

DestArgument = typer.Argument(..., help="Local folder (loadable with load_dataset(DIR)).")
BucketOption = typer.Option(None, "--bucket", help="Bucket of the datasets (default: settings).")


def _s3(bucket: str | None):
    clients = Clients.for_bucket(bucket)
    return clients.s3, clients.settings.datasets.prefix


@app.command("build")
def build(
    project: str = typer.Option(..., "--project", "-p", help="Label Studio project title or id."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset name."),
    policy: str = typer.Option(
        "latest", "--policy", help="Annotations per task: latest | ground_truth_first | all."
    ),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Clusters in eval."),
    pii: str = typer.Option("redact", "--pii", help="E-mails, phones: drop | redact | off."),
    secrets: str = typer.Option("drop", "--secrets", help="Keys, tokens: drop | redact | off."),
    dedup_on: str = typer.Option(
        "prompt_response", "--dedup-on", help="Compare prompt | prompt_response."
    ),
    threshold: float = typer.Option(0.8, "--threshold", help="Near-duplicate Jaccard threshold."),
    tag: str = typer.Option(None, "--tag", help="Also point this tag at the version."),
    full: bool = typer.Option(False, "--full", help="Read the whole project (a full export "
                              "snapshot) instead of the changes since the parent version."),
    scratch: bool = typer.Option(False, "--scratch", help="Ignore the parent version: "
                                 "dedup and split every row anew."),
    draft_policy: str = typer.Option(
        "exclude", "--draft-policy",
        help="Model drafts accepted unchanged: exclude (default) | include."),
    bucket: str = BucketOption,
    dask_address: str = typer.Option(
        None, "--dask-address", help="Run mapped tasks on this dask.distributed scheduler."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Export the project's annotations and commit a dataset version (no-op if unchanged)."""
    from sftflow.flows.build_dataset import BuildParams, build_dataset, build_dataset_on

    params = parse_params(
        BuildParams, "build", project=project, dataset=dataset, annotation_policy=policy,
        eval_fraction=eval_fraction, tag=tag, bucket=bucket, draft_policy=draft_policy,
        mode="scratch" if scratch else "full" if full else "auto",
        filters={"pii": pii, "secrets": secrets}, dedup={"on": dedup_on, "threshold": threshold},
    )
    flow_fn = build_dataset_on(dask_address) if dask_address else build_dataset
    with prefect_api(get_settings()):
        report = flow_fn(params)
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    console.print(report.message, highlight=False)
    if report.mode:
        console.print(f"  mode: {report.mode}" + (f" ({report.mode_reason})"
                                                  if report.mode_reason else ""),
                      highlight=False)
    for stage in ("changes", "export", "filters", "dedup"):
        counts = report.counts.get(stage) or {}
        shown = ", ".join(f"{k}: {v}" for k, v in counts.items() if v and isinstance(v, int))
        console.print(f"  {stage}: {shown}", highlight=False)
    if report.uri:
        console.print(f"  manifest: {report.uri}  ({report.bytes_written:,} bytes written)",
                      highlight=False)


@datasets_app.command("list")
def list_cmd(
    dataset: str = typer.Argument(None, help="A dataset: list its versions."),
    strict: bool = typer.Option(False, "--strict",
                                help="Exit 1 when a damaged manifest was found (after listing)."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """The datasets in the bucket (each one's latest version), or the versions of one dataset.

    A damaged manifest (not JSON, refused by the manifest model, a path leaving its dataset,
    another version's manifest) never hides the others: everything readable is listed, each
    damaged manifest is named on stderr (dataset, key, reason; under "damaged" with --json),
    and the exit status stays 0, or is 1 with --strict. The bucket-wide listing reads each
    dataset's latest manifest; `list NAME` reads every manifest of NAME."""
    from sftflow.tasks.versions.read import scan_datasets, scan_versions
    from sftflow.tasks.versions.refs import latest_version, list_tags

    s3, prefix = _s3(bucket)
    if dataset:
        listing = scan_versions(s3, dataset, prefix=prefix)
        latest = latest_version(s3, dataset, prefix=prefix)
        tags = list_tags(s3, dataset, prefix=prefix)
        versions = [{**v, "latest": v["version"] == latest,
                     "tags": sorted(t for t, tv in tags.items() if tv == v["version"])}
                    for v in listing.versions]
        _print_versions(dataset, versions, listing.damaged, as_json)
    else:
        listing = scan_datasets(s3, prefix=prefix)
        _print_datasets(listing.datasets, listing.damaged, as_json)
    for d in listing.damaged:
        console_err.print(f"[yellow]warning:[/yellow] damaged manifest of {d.dataset!r}, "
                          f"{s3.uri(d.key)}: {d.reason}", highlight=False, soft_wrap=True)
    if strict and listing.damaged:
        raise SftflowError(f"--strict: {len(listing.damaged)} damaged manifest(s), named above")


def _print_versions(dataset: str, versions: list[dict[str, Any]], damaged: list,
                    as_json: bool) -> None:
    if as_json:
        print_json({"dataset": dataset, "versions": versions,
                    "damaged": [d.as_dict() for d in damaged]})
        return
    table = Table("version", "created_at", "train", "eval", "parent", "latest/tags")
    for v in versions:
        marks = (["latest"] if v["latest"] else []) + v["tags"]
        table.add_row(v["version"], v["created_at"][:19], str(v["rows"].get("train", 0)),
                      str(v["rows"].get("eval", 0)), v["parent"] or "-", ", ".join(marks))
    for d in damaged:
        table.add_row(d.key.rsplit("/", 2)[-2], "damaged", "?", "?", "-", "")
    console.print(table)


def _print_datasets(datasets: list[dict[str, Any]], damaged: list, as_json: bool) -> None:
    if as_json:
        print_json({"datasets": datasets, "damaged": [d.as_dict() for d in damaged]})
        return
    table = Table("dataset", "latest", "train", "eval")
    for d in datasets:
        rows = d["rows"]
        table.add_row(d["dataset"], d["latest"] or "-",
                      "damaged" if rows is None else str(rows.get("train", "-")),
                      "damaged" if rows is None else str(rows.get("eval", "-")))
    console.print(table)


@datasets_app.command("show")
def show(
    ref: str = typer.Argument(..., help="NAME[@VERSION|@TAG] (default: latest)."),
    verify: bool = typer.Option(False, "--verify", help="Check every file's sha256."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """A version's manifest summary: rows, files, source, stats."""
    from sftflow.tasks.versions.manifest import parse_ref
    from sftflow.tasks.versions.read import data_files, load_manifest

    s3, prefix = _s3(bucket)
    name, version = parse_ref(ref)
    m = load_manifest(s3, name, version, verify=verify, prefix=prefix)
    summary = {
        "dataset": m.dataset, "version": m.version, "parent": m.parent,
        "created_at": m.created_at, "rows": m.rows, "source": m.source,
        "config_hash": m.config_hash, "code_version": m.code_version,
        "run_id": m.run_id, "verified": verify,
        "files": {fmt: len(m.files_of(fmt)) for fmt in sorted({f.format for f in m.files})},
        "bytes": sum(f.size for f in m.files),
        "stats": {k: {kk: vv for kk, vv in v.items() if kk != "examples"}
                  if isinstance(v, dict) else v for k, v in m.stats.items()},
        "train_files": data_files(s3, m, "train"),
        "eval_files": data_files(s3, m, "eval"),
        "draft_return": (m.stats.get("drafts") or {}).get("return"),
    }
    if as_json:
        print_json(summary)
        return
    console.print(f"[bold]{m.dataset}@{m.version}[/bold] (parent {m.parent}, "
                  f"{m.created_at[:19]}){' verified' if verify else ''}", highlight=False)
    console.print(f"rows: {m.rows}; files: {summary['files']}; {summary['bytes']:,} bytes",
                  highlight=False)
    src = m.source
    console.print(f"source: project {src.get('project_title')!r} (id {src.get('project_id')}), "
                  f"export {src.get('export_id')} at {src.get('snapshot_at')}", highlight=False)
    for stage, counts in summary["stats"].items():
        if stage == "drafts" and isinstance(counts, dict):
            counts = {k: v for k, v in counts.items() if k != "return"}  # shown below
        console.print(f"{stage}: {counts}", highlight=False)
    _print_draft_return(summary["draft_return"])


def _print_draft_return(ret: dict[str, Any] | None) -> None:
    """The seconds drafts saved (``stats.drafts.return``), one line per model and annotator."""
    if not ret or not ret.get("models"):
        return
    base, untimed = ret.get("baseline") or {}, ret.get("untimed") or {}
    console.print(f"draft return (Label Studio lead_time, like-for-like prompt lengths): "
                  f"without a draft median {base.get('median_s')} s over "
                  f"{base.get('annotations', 0)} annotations; saved in total "
                  f"{ret.get('saved_total_s')} s; without lead_time (counted apart): "
                  f"{untimed.get('drafted', 0)} drafted, {untimed.get('undrafted', 0)} not",
                  highlight=False)
    for label, key in (("model", "models"), ("annotator", "annotators")):
        for name, f in (ret.get(key) or {}).items():
            console.print(f"  {label} {name}: {f['saved_per_task_s']} s saved per task "
                          f"({f['median_with_draft_s']} s with a draft, "
                          f"{f['median_without_draft_s']} s without; {f['compared']} compared, "
                          f"{f['untimed']} without lead_time, {f['no_baseline']} without a "
                          f"baseline), {f['saved_total_s']} s in total; acceptance rate "
                          f"{f.get('acceptance_rate')}", highlight=False)


@datasets_app.command("diff")
def diff(
    a: str = typer.Argument(..., help="NAME@VERSION (or NAME for latest)."),
    b: str = typer.Argument(..., help="NAME@VERSION or just VERSION (same dataset as A)."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Rows added, removed, changed and unchanged from A to B."""
    from sftflow.tasks.versions.manifest import parse_ref
    from sftflow.tasks.versions.read import diff_versions

    s3, prefix = _s3(bucket)
    name, va = parse_ref(a)
    if "@" in b:
        name_b, vb = parse_ref(b)
        if name_b != name:
            raise ConfigError(f"diff compares versions of one dataset, not {name!r} and {name_b!r}")
    else:
        vb = b
    out = diff_versions(s3, name, va, vb, prefix=prefix)
    if as_json:
        print_json(out)
        return
    console.print(f"{name}: {out['a']} -> {out['b']}", highlight=False)
    for k in ("added", "removed", "changed"):
        console.print(f"  {k}: {out[k]}", highlight=False)
    console.print(f"  unchanged: {out['unchanged']}; {out['bytes_shared_with_a']:,} of "
                  f"{out['bytes_b']:,} bytes shared with {out['a']}", highlight=False)


@datasets_app.command("pull")
def pull(
    ref: str = typer.Argument(..., help="NAME[@VERSION|@TAG]."),
    dest: Path = DestArgument,
    force: bool = typer.Option(False, "--force", help="Replace the contents of a non-empty "
                               "DEST that is not an earlier pull (they are deleted)."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Download a version as a Hugging Face dataset repository (README.md card, data/<split>/
    Parquet), checksums verified: `datasets.load_dataset(DEST)` loads it and
    `huggingface-cli upload REPO DEST --repo-type dataset` publishes it.

    DEST ends up holding that version only: a new or empty folder, or an earlier pull (its
    marker .sftflow-pull.json), which is replaced whole (downloaded beside it, then swapped
    in; a failed pull leaves it as it was). Any other non-empty folder is refused unless
    --force."""
    from sftflow.tasks.versions.manifest import parse_ref
    from sftflow.tasks.versions.pull import pull_version

    s3, prefix = _s3(bucket)
    name, version = parse_ref(ref)
    out = pull_version(s3, name, version, dest, prefix=prefix,
                       license=get_settings().datasets.license, force=force)
    if as_json:
        print_json(out)
        return
    card = out["card"]
    if out["replaced"]:
        was = out["replaced"]
        console.print(f"replaced the earlier pull {was['dataset']}@{was['version']}",
                      highlight=False)
    console.print(f"{name}@{out['version']} -> {out['dir']} ({out['files']} files, "
                  f"{out['bytes_downloaded']:,} bytes downloaded); card: license "
                  f"{card['license']}, languages {', '.join(card['languages']) or 'none detected'}, "
                  f"{card['size_category']} rows", highlight=False)
    console.print(f"  load: datasets.load_dataset({str(out['dir'])!r})\n"
                  f"  publish: huggingface-cli upload <user>/{name} {out['dir']} --repo-type dataset",
                  highlight=False)


@datasets_app.command("tag")
def tag(
    ref: str = typer.Argument(..., help="NAME@VERSION (or NAME for latest)."),
    name_of_tag: str = typer.Argument(..., metavar="TAG", help="Tag name."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Point a tag at a version."""
    from sftflow.tasks.versions.manifest import parse_ref
    from sftflow.tasks.versions.refs import resolve, set_tag

    s3, prefix = _s3(bucket)
    name, version = parse_ref(ref)
    version = resolve(s3, name, version, prefix=prefix)
    set_tag(s3, name, name_of_tag, version, prefix=prefix)
    out = {"dataset": name, "tag": name_of_tag, "version": version}
    if as_json:
        print_json(out)
        return
    console.print(f"{name}: {name_of_tag} -> {version}", highlight=False)


@datasets_app.command("gc")
def gc(
    dataset: str = typer.Argument(..., help="Dataset name."),
    dry_run: bool = typer.Option(True, "--dry-run/--delete",
                                 help="Only report (default), or delete."),
    min_age_s: float | None = typer.Option(
        None, "--min-age-s", show_default=False,
        help="Keep unreferenced objects younger than this; default 3600 s. Lowest accepted: "
        "the retention floor (SFTFLOW_DATASETS__GC_MIN_AGE_FLOOR_S, 3600 s unless set)."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Objects no manifest references (crashed commits); deleted only with --delete.
    A --min-age-s below the retention floor is refused: a younger object may belong to a build
    in progress."""
    from sftflow.tasks.versions.gc import MIN_AGE_FLOOR_S
    from sftflow.tasks.versions.gc import gc as collect_garbage

    floor = get_settings().datasets.gc_min_age_floor_s
    if min_age_s is None:  # a lowered floor never lowers the default age
        min_age_s = max(MIN_AGE_FLOOR_S, floor)
    s3, prefix = _s3(bucket)
    out = collect_garbage(s3, dataset, prefix=prefix, dry_run=dry_run, min_age_s=min_age_s,
                          min_age_floor_s=floor)
    if as_json:
        print_json(out)
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{dataset}: {out['versions']} versions, {out['objects']} objects; {verb} "
                  f"{out['unreferenced']} unreferenced ({out['unreferenced_bytes']:,} bytes); "
                  f"{out['kept_too_young']} too young to collect", highlight=False)
