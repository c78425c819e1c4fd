"""Project bootstrap: the Supervised LLM Fine-tuning labeling interface, created once, never
silently changed.

A project is *compatible* when its config shows the prompt with ``<Text name="prompt"
value="$prompt">`` and collects the response in ``<TextArea name="instruction"
toName="prompt">``: everything downstream (export, build) reads exactly those names.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from sftflow.core.errors import ConfigError
from sftflow.tasks.adapters.labelstudio import PROMPT_NAME, RESPONSE_NAME, find_project
from sftflow.tasks.runtime.declare import io_task

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

#: Label Studio's "Supervised Language Model Fine-tuning" template (generative-ai/supervised-llm),
#: with two changes for drafts: the response is ``editable`` (a draft is edited in place, not
#: deleted and retyped), and the response's text is dark (the template's white text made a
#: pre-filled draft white on white in Label Studio 1.23's editor; tests/tasks/drafts/test_editor.py).
SFT_LABEL_CONFIG = f"""<View className="root">
  <Style>
  .root {{
    font-family: 'Roboto', sans-serif;
    line-height: 1.6;
    background-color: #f0f0f0;
  }}
  .container {{
    margin: 0 auto;
    padding: 20px;
    background-color: #ffffff;
    border-radius: 5px;
    box-shadow: 0 4px 8px 0 rgba(0, 0, 0, 0.1), 0 6px 20px 0 rgba(0, 0, 0, 0.1);
  }}
  .prompt {{
    padding: 20px;
    background-color: #0084ff;
    color: #ffffff;
    border-radius: 5px;
    margin-bottom: 20px;
    box-shadow: 0 2px 4px 0 rgba(0, 0, 0, 0.1), 0 3px 10px 0 rgba(0, 0, 0, 0.1);
  }}
  .answer-input {{
    flex-basis: 49%;
    padding: 20px;
    background-color: rgba(44, 62, 80, 0.9);
    color: #ffffff;
    border-radius: 5px;
    box-shadow: 0 2px 4px 0 rgba(0, 0, 0, 0.1), 0 3px 10px 0 rgba(0, 0, 0, 0.1);
    width: 100%;
    border: none;
    font-family: 'Roboto', sans-serif;
    font-size: 16px;
    outline: none;
  }}
  .answer-input .lsf-textarea__region p,
  .answer-input textarea {{
    color: #1f2937;
  }}
  .answer-input:focus {{
    outline: none;
  }}
  .answer-input:hover {{
    background-color: rgba(52, 73, 94, 0.9);
    cursor: pointer;
    transition: all 0.3s ease;
  }}
  .lsf-richtext__line:hover {{
    background: unset;
  }}
  </Style>
  <View className="container">
    <View className="prompt">
      <Text name="{PROMPT_NAME}" value="${PROMPT_NAME}" />
    </View>
    <View className="answer-input">
      <TextArea name="{RESPONSE_NAME}" toName="{PROMPT_NAME}"
                maxSubmissions="1" required="true"
                requiredMessage="You must provide the response to the prompt"
                placeholder="Type your answer here..."
                rows="10" editable="true"
      />
    </View>
  </View>
</View>
"""


def config_problems(label_config: str | None) -> list[str]:
    """Why a labeling config cannot hold SFT prompts and responses (empty list: compatible)."""
    if not label_config or not label_config.strip():
        return ["the project has no labeling config"]
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as err:
        return [f"the labeling config is not valid XML ({err})"]
    problems = []
    texts = [e for e in root.iter("Text") if e.get("name") == PROMPT_NAME]
    if not texts:
        problems.append(f'no <Text name="{PROMPT_NAME}">')
    elif texts[0].get("value") != f"${PROMPT_NAME}":
        problems.append(f'<Text name="{PROMPT_NAME}"> does not show value="${PROMPT_NAME}"')
    areas = [e for e in root.iter("TextArea") if e.get("name") == RESPONSE_NAME]
    if not areas:
        problems.append(f'no <TextArea name="{RESPONSE_NAME}">')
    elif areas[0].get("toName") != PROMPT_NAME:
        problems.append(f'<TextArea name="{RESPONSE_NAME}"> is not toName="{PROMPT_NAME}"')
    return problems


def ensure_project(client: LabelStudio, project: str | int, *, create: bool = True) -> Any:
    """The project by title or id, created with the SFT config when missing (titles only).

    An existing project with an incompatible config is a ConfigError naming what is wrong;
    it is never modified.
    """
    found = find_project(client, project, counters=False)  # ingest reads none of them
    if found is None:
        if not create or isinstance(project, int) or str(project).isdigit():
            raise ConfigError(f"Label Studio project {project!r} does not exist")
        found = client.projects.create(
            title=str(project),
            description="Prompts for supervised fine-tuning (created by sftflow ingest).",
            label_config=SFT_LABEL_CONFIG,
        )
        # Two runs may have created the same title at once: the oldest wins, ours (empty) goes.
        same = sorted(p.id for p in client.projects.list(title=str(project)) if p.title == str(project))
        if same and same[0] != found.id:
            client.projects.delete(id=found.id)
        found = client.projects.get(id=same[0] if same else found.id)
    problems = config_problems(found.label_config)
    if problems:
        raise ConfigError(
            f"Label Studio project {found.title!r} (id {found.id}) has an incompatible labeling "
            f"config: {'; '.join(problems)}. Use another project or fix its config by hand."
        )
    return found


#: ``ensure_project`` as a Prefect task with I/O retries (a retry finds what the first created);
#: a ConfigError (missing or incompatible project) is final.
ensure_project_task = io_task(name="ensure-project")(ensure_project)
