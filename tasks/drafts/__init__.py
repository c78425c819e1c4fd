"""Model drafts for annotators (pre-annotation): a trained model's response to every open
Label Studio task, written as a prediction that annotators edit instead of writing from nothing.

- ``generators``: the ``DraftGenerator`` protocol and its two implementations (the model
  itself through ``transformers``; an OpenAI-compatible chat endpoint such as vLLM or TGI);
- ``model``: which model drafts (a fine-tune job's lineage record, or its dataset's ``best``);
- ``stage``: finding open tasks, drafting them in batches, writing predictions, ``DraftReport``.

The flow is ``flows/draft_responses.py``; docs/drafts.md says what annotators see.
"""
