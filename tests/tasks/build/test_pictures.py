"""Pictures of a dataset version: the counts they draw, valid small PNGs, and (on a real Prefect
API) the image and markdown artifacts they are published as."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from sftflow.tasks.build import pictures

ROWS = [{"prompt": "p" * (10 + i), "completion": "c" * (100 + 3 * i), "cluster_id": f"{i:016x}"}
        for i in range(40)]
EXCLUSIONS = (
    [{"stage": "dedup", "reason": "duplicate", "cluster_id": f"{0:016x}"}] * 3  # cluster of 4
    + [{"stage": "dedup", "reason": "duplicate", "cluster_id": f"{i:016x}"} for i in (1, 2)]  # 2 of 2
    + [{"stage": "filter", "reason": "pii"}] * 2
    + [{"stage": "filter", "reason": "too_short"}]
    + [{"stage": "export", "reason": "skipped"}]
)


def _image(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(png))
    img.verify()
    return Image.open(io.BytesIO(png))


def test_cluster_sizes_are_drawn_in_at_most_nine_bars():
    assert [pictures.size_bin(n) for n in (1, 2, 4, 5, 9, 10, 19, 20, 50, 99, 100, 10**6)] == [
        "1", "2", "4", "5-9", "5-9", "10-19", "10-19", "20-49", "50-99", "50-99", "100+", "100+"]
    assert len({pictures.size_bin(n) for n in range(1, 10_000)}) == len(pictures.SIZE_BINS) == 9


def test_cluster_sizes_and_drops_count_what_the_build_dropped():
    sizes = pictures.cluster_sizes(ROWS, EXCLUSIONS)
    assert len(sizes) == 40 and sorted(sizes, reverse=True)[:4] == [4, 2, 2, 1]
    assert sum(sizes) == 40 + 5  # every kept row plus every dedup exclusion
    assert pictures.drops_by_reason(EXCLUSIONS) == {
        "dedup:duplicate": 5, "filter:pii": 2, "filter:too_short": 1, "export:skipped": 1}
    assert pictures.row_lengths(ROWS[:2]) == {"prompt": [10, 11], "response": [100, 103]}


def test_version_pictures_are_three_small_pngs_that_differ_with_the_data():
    stats = pictures.version_stats(ROWS, EXCLUSIONS)
    pngs = pictures.version_pictures(ROWS, stats)
    assert set(pngs) == {"lengths", "clusters", "drops"}
    for png in pngs.values():
        img = _image(png)
        assert img.size == (480, 256) and img.format == "PNG"
        assert 2_000 < len(png) < 60_000
        assert len(set(img.convert("RGB").getdata())) > 10  # drawn, not blank
    assert len(set(pngs.values())) == 3
    # plain lengths and the flat ``dropped:<reason>`` counts of the build report work too
    flat = pictures.version_pictures([5, 50, 500], {"dropped:near_duplicate": 3, "kept": 10})
    assert all(_image(p).size == (480, 256) for p in flat.values())
    assert flat["drops"] != pictures.version_pictures([5, 50, 500], {})["drops"]


def test_an_empty_version_still_gets_its_three_pictures():
    pngs = pictures.version_pictures([], {})
    assert set(pngs) == {"lengths", "clusters", "drops"}
    assert all(_image(p).size == (480, 256) for p in pngs.values())


def test_the_markdown_holds_every_picture_inline_under_its_caption():
    pngs = pictures.version_pictures(ROWS, pictures.version_stats(ROWS, EXCLUSIONS))
    md = pictures.pictures_markdown(pngs, "qa @ v1")
    assert md.startswith("# qa @ v1")
    for name, png in pngs.items():
        assert f"## {pictures.CAPTIONS[name]}" in md
        assert f"]({pictures.data_uri(png)})" in md


@pytest.mark.prefect
def test_published_pictures_are_image_artifacts_on_the_prefect_api(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    @flow
    def build_like() -> dict:
        return pictures.publish_version_pictures_task("pics-qa", "v1", ROWS, EXCLUSIONS)

    ids = build_like()
    keys = {f"version-pictures-pics-qa-{n}": n for n in ("lengths", "clusters", "drops")}
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[*keys, "version-pictures-pics-qa"])))
    by_key = {a.key: a for a in found}
    assert set(by_key) == {*keys, "version-pictures-pics-qa"}
    assert {str(by_key[k].id) for k in keys} == {str(ids[n]) for n in keys.values()}
    for key in keys:
        art = by_key[key]
        assert art.type == "image" and art.data.startswith("data:image/png;base64,")
        assert _image(base64.b64decode(art.data.split(",", 1)[1])).size == (480, 256)
    md = by_key["version-pictures-pics-qa"]
    assert md.type == "markdown" and md.data.count("data:image/png;base64,") == 3
