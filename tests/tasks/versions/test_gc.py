"""gc's retention floor (tasks.versions.gc) on the real SeaweedFS: a min age below it is
refused before anything is listed or deleted; only an explicit floor moves it."""

from __future__ import annotations

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.versions.gc import gc
from tests.tasks._finetune import make_version

pytestmark = pytest.mark.integration

ORPHAN = "datasets/g/shards/orphan.parquet"


def test_gc_refuses_a_min_age_below_the_retention_floor(s3):
    make_version(s3, "g", 20)
    s3.put_bytes(ORPHAN, b"a crashed build's shard, or a build's in progress")
    with pytest.raises(SftflowError, match="retention floor of 3600 s"):
        gc(s3, "g", min_age_s=0, dry_run=False)
    with pytest.raises(SftflowError, match="retention floor of 3600 s"):
        gc(s3, "g", min_age_s=3599.9)
    assert s3.head(ORPHAN) is not None  # refused before anything was deleted

    from sftflow.core.settings import DatasetSettings
    from sftflow.tasks.versions.gc import MIN_AGE_FLOOR_S

    assert MIN_AGE_FLOOR_S == 3600 == DatasetSettings().gc_min_age_floor_s
    assert gc(s3, "g")["kept_too_young"] == 1  # the default min age is the floor itself
    with pytest.raises(SftflowError, match="retention floor of 60 s"):
        gc(s3, "g", min_age_s=59, min_age_floor_s=60)
    done = gc(s3, "g", min_age_s=0, min_age_floor_s=0, dry_run=False)  # an explicit floor
    assert done["deleted"] == 1 and s3.head(ORPHAN) is None
