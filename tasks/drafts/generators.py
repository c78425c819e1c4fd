"""Draft generators: one response per prompt, from a trained model or a served one.

A generator is anything with ``model_version`` (the id written on each Label Studio prediction,
the fine-tune job id) and ``generate(prompts) -> list[str | Exception]``: one result per prompt,
in order, and a prompt that fails is an ``Exception`` in its slot, never a failed batch.

- :class:`TransformersGenerator`: the trained model itself through ``transformers``, on CPU
  (or the first GPU), greedy, at most ``max_new_tokens`` (cut to what the model's context
  leaves after the prompt); the chat template when the tokenizer has one, else the plain
  prompt.
- :class:`OpenAIChatGenerator`: any OpenAI-compatible ``POST /chat/completions`` (vLLM, TGI, a
  hosted API), ``temperature`` 0, transient errors retried through ``polling.retry``.

Both put the same messages in front of the model as the OpenAI training files do
(:func:`chat_messages`, from ``formats.openai_chat_jsonl``), with the system prompt the model's
dataset version was built with.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from sftflow.core.errors import ConfigError, SftflowError
from sftflow.core.urls import redact_url
from sftflow.tasks.runtime.polling import Backoff, retry
from sftflow.tasks.versions import formats


class DraftError(SftflowError):
    """A prompt that got no draft, with a short ``reason`` the report counts by."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class HttpStatusError(Exception):
    """A non-2xx answer; ``status_code`` lets ``is_transient`` retry 408/429/5xx only."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


@runtime_checkable
class DraftGenerator(Protocol):
    model_version: str

    def generate(self, prompts: list[str]) -> list[str | Exception]: ...


def failure_reason(err: BaseException) -> str:
    """The reason a draft failed, as the report counts it: ``http 500``, ``timeout``..."""
    if isinstance(err, DraftError):
        return err.reason
    if isinstance(err, HttpStatusError):
        return f"http {err.status_code}"
    if isinstance(err, httpx.TimeoutException):
        return "timeout"
    if isinstance(err, httpx.TransportError):
        return "connection"
    return type(err).__name__


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """``[system?, user]``: the prompt side of a row of the OpenAI chat training files, taken
    from ``formats.openai_chat_jsonl`` itself so both sides keep one layout."""
    line = formats.openai_chat_jsonl([{"prompt": prompt, "completion": ""}],  # type: ignore[list-item]
                                     system_prompt)
    messages = json.loads(line)["messages"]
    return [m for m in messages if m["role"] != "assistant"]


def _draft_text(text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise DraftError("empty_draft", "the model answered with an empty text")
    return text


# -- transformers ------------------------------------------------------------------------------
class TransformersGenerator:
    """A local model folder (full model, or a LoRA adapter on ``base_dir``), loaded once."""

    def __init__(self, model_dir: str | Path, *, model_version: str, base_dir: str | Path | None = None,
                 system_prompt: str | None = None, max_new_tokens: int = 256):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_version = model_version
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir or model_dir), local_files_only=True)
        if base_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(model_dir), local_files_only=True).merge_and_unload()
        self.model = model.to(self.device).eval()
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    def _input_ids(self, prompt: str) -> Any:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                chat_messages(prompt, self.system_prompt), add_generation_prompt=True,
                return_tensors="pt", return_dict=True)["input_ids"]
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    def new_tokens(self, prompt_tokens: int) -> int:
        """``max_new_tokens``, cut to what the model's context leaves after the prompt; a
        prompt that leaves no room fails (``prompt_too_long``), alone."""
        if not self.context:
            return self.max_new_tokens
        room = self.context - prompt_tokens
        if room < 1:
            raise DraftError("prompt_too_long", f"the prompt is {prompt_tokens} tokens: no room "
                             f"for a draft in the model's {self.context}-token context")
        return min(self.max_new_tokens, room)

    def _one(self, prompt: str) -> str:
        import torch

        ids = self._input_ids(prompt)
        new_tokens = self.new_tokens(ids.shape[-1])
        ids = ids.to(self.device)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                do_sample=False, pad_token_id=self.tokenizer.eos_token_id if pad is None else pad)
        return _draft_text(self.tokenizer.decode(out[0, ids.shape[-1]:], skip_special_tokens=True))

    def generate(self, prompts: list[str]) -> list[str | Exception]:
        results: list[str | Exception] = []
        for prompt in prompts:  # one at a time: no padding effects, one failure stays one
            try:
                results.append(self._one(prompt))
            except Exception as err:  # noqa: BLE001 - per-prompt outcome, counted by the caller
                results.append(err)
        return results


# -- OpenAI-compatible chat --------------------------------------------------------------------
def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]


class OpenAIChatGenerator:
    """``POST {base_url}/chat/completions`` per prompt, ``concurrency`` requests at a time."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None, *, model_version: str,
                 system_prompt: str | None = None, max_new_tokens: int = 256, timeout_s: float = 120.0,
                 attempts: int = 4, retry_delay_s: tuple[float, float] = (0.5, 30.0),
                 concurrency: int = 4):
        if not model:
            raise ConfigError("no model name for the chat endpoint (SFTFLOW_DRAFTS__MODEL, or a job "
                              "with a fine_tuned_model)")
        self.model_version = model_version
        self.model = model
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.concurrency = concurrency
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.where = redact_url(self.url)  # what errors name: no credential in a message
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=timeout_s)

    def _request(self, prompt: str) -> str:
        body = {"model": self.model, "messages": chat_messages(prompt, self.system_prompt),
                "max_tokens": self.max_new_tokens, "temperature": 0}

        def once() -> str:
            resp = self._http.post(self.url, json=body)
            if resp.status_code >= 400:
                raise HttpStatusError(resp.status_code, f"chat endpoint {self.where}: "
                                                        f"{resp.status_code} {_error_message(resp)}")
            try:
                return str(resp.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError) as err:
                raise DraftError("bad_response", f"chat endpoint {self.where} answered "
                                 f"{resp.text[:200]!r}") from err

        return _draft_text(retry(once, attempts=self.attempts, backoff=Backoff(*self.retry_delay_s)))

    def _one(self, prompt: str) -> str | Exception:
        try:
            return self._request(prompt)
        except Exception as err:  # noqa: BLE001 - per-prompt outcome, counted by the caller
            return err

    def generate(self, prompts: list[str]) -> list[str | Exception]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            return list(pool.map(self._one, prompts))

    def close(self) -> None:
        self._http.close()
