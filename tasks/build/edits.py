"""Model drafts as Label Studio's export shows them: which draft an annotation started from,
how far the annotator edited it, and how far the annotators of one task agree.

Label Studio 1.23 records the prediction an annotation started from as the annotation's
``parent_prediction`` (the prediction's id; the editor sets it when the annotator submits from
a shown prediction, the API when a client passes it). An export snapshot lists a task's
predictions as bare ids unless it is created with :data:`EXPORT_SERIALIZATION`; then each
prediction comes whole, with its ``model_version`` (the drafting job's id) and ``result``.

Edit similarity is rapidfuzz's normalised Levenshtein similarity, ``1 - distance / max(len)``
over characters: one unit per character typed, deleted or replaced (what an annotator does at
the keyboard), 1.0 exactly when the texts are equal, 0.0 when nothing at all is kept.
``fuzz.ratio`` (the Indel distance, where a replaced character costs two, normalised by the
sum of the lengths) rates rewrites kinder: "kitten" -> "sitting" is 0.62 there, 0.57 here;
"abcdefgh" reversed is 0.125 there, 0.0 here. Bit-parallel C++: under 1 us for a 1.5 KB pair
that differs in a few characters, about 60 us for two unrelated 1.5 KB texts.

A draft is *accepted unchanged* when the response has the draft's words in the draft's order:
whitespace is not an edit (the response is still the model's own output, which is what the
training policy is about); the similarity itself is taken on the raw texts.

These are the parse's pieces; the figures built from them (acceptance per model, agreement,
outlying annotators, the training policy) are in ``sftflow.tasks.drafts.figures``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

from rapidfuzz.distance import Levenshtein

#: ``serialization_options`` of an export snapshot whose tasks carry their predictions whole.
EXPORT_SERIALIZATION: dict[str, Any] = {"predictions": {"only_id": False}}

#: One pair of annotators of a task: (annotator, annotator, edit similarity), names sorted.
Pair = tuple[str, str, float]


class DraftFields(TypedDict):
    """The draft columns of a row (all None: the annotation did not start from a draft)."""

    draft_model: str | None  # model_version of the prediction the annotator started from
    draft_similarity: float | None  # edit similarity of the response to that draft's text
    draft_unchanged: bool | None  # the response is the draft, up to whitespace


NO_DRAFT: DraftFields = {"draft_model": None, "draft_similarity": None, "draft_unchanged": None}


def edit_similarity(a: str, b: str) -> float:
    """Normalised Levenshtein similarity of two texts, in [0, 1]; 1.0 iff they are equal."""
    return Levenshtein.normalized_similarity(a, b)


def draft_fields(draft: tuple[str, str | None] | None, completion: str) -> DraftFields:
    """The draft columns of a row whose annotation started from ``draft`` (model_version,
    text; the text is None when the prediction has no response in the SFT TextArea)."""
    if draft is None:
        return dict(NO_DRAFT)  # type: ignore[return-value]
    model, text = draft
    if text is None:
        return {"draft_model": model, "draft_similarity": None, "draft_unchanged": None}
    return {"draft_model": model, "draft_similarity": edit_similarity(text, completion),
            "draft_unchanged": _words(text) == _words(completion)}


def _words(text: str) -> list[str]:
    return text.split()


def task_pairs(answers: Sequence[tuple[str, str]]) -> list[Pair]:
    """Every pair of ``answers`` ((annotator, response) of one task) by two different
    annotators, with the edit similarity of their responses. Sorted: the same annotations give
    the same list."""
    pairs: list[Pair] = []
    for i, (a, text_a) in enumerate(answers):
        for b, text_b in answers[i + 1:]:
            if a != b:
                first, second = sorted((a, b))
                pairs.append((first, second, edit_similarity(text_a, text_b)))
    return sorted(pairs)
