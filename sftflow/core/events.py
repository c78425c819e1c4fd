"""Names of the Prefect events sftflow emits and reacts to, and their resource ids.

One place, so that emitters (flows, the webhook bridge) and triggers (deployments) agree.
"""

PROMPTS_ARRIVED = "sftflow.prompts.arrived"  # S3 notification: a new prompt file
PROMPTS_INGESTED = "sftflow.prompts.ingested"  # ingest_prompts finished, with counts
ANNOTATION_CREATED = "sftflow.annotation.created"  # Label Studio webhook, with counters
DATASET_VERSIONED = "sftflow.dataset.versioned"  # build_dataset committed a version
FINETUNE_SUBMITTED = "sftflow.finetune.submitted"
FINETUNE_SUCCEEDED = "sftflow.finetune.succeeded"
FINETUNE_FAILED = "sftflow.finetune.failed"
DRAFTS_WRITTEN = "sftflow.drafts.written"  # draft_responses wrote model drafts, with counts

#: Resource label the bridge sets on annotation events: "below", "reached" or "unset"; the
#: build deployment's trigger matches "reached".
THRESHOLD_LABEL = "sftflow.threshold"


def project_resource(project: str | int) -> dict[str, str]:
    return {"prefect.resource.id": f"sftflow.labelstudio.project.{project}"}


def bucket_resource(bucket: str, key: str = "") -> dict[str, str]:
    return {"prefect.resource.id": f"sftflow.s3.{bucket}" + (f".{key}" if key else "")}


def dataset_resource(dataset: str) -> dict[str, str]:
    return {"prefect.resource.id": f"sftflow.dataset.{dataset}"}


def model_resource(job: str) -> dict[str, str]:
    return {"prefect.resource.id": f"sftflow.model.{job}"}
