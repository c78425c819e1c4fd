"""Local checks of chat-format JSONL (OpenAI fine-tuning format) before anything is uploaded.

Each line must be ``{"messages": [{"role": ..., "content": ...}, ...]}`` with known roles,
string content, at least one user and one assistant message, the last message from the
assistant, and an estimated token count under the per-example limit. The file must hold at least
``min_examples`` examples (OpenAI's minimum is 10). Token counts are an estimate (UTF-8 bytes / 4
plus 4 per message, the usual rule of thumb for BPE vocabularies); pass ``count_tokens`` to use
a real tokenizer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool"})
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(text: str) -> int:
    return (len(text.encode("utf-8")) + 3) // 4


@dataclass
class ChatValidation:
    examples: int = 0
    valid: int = 0
    tokens: int = 0
    max_example_tokens: int = 0
    errors: Counter = field(default_factory=Counter)  # reason -> count
    samples: list[dict[str, Any]] = field(default_factory=list)  # first few {line, reason}

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "valid": self.valid,
            "tokens_estimated": self.tokens,
            "max_example_tokens": self.max_example_tokens,
            "errors": dict(self.errors),
            "error_samples": self.samples,
        }


def _example_problem(obj: Any, count_tokens: Callable[[str], int], max_tokens: int) -> tuple[str | None, int]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        return "no messages list", 0
    tokens = 0
    roles = []
    for msg in obj["messages"]:
        if not isinstance(msg, dict):
            return "message is not an object", 0
        role = msg.get("role")
        if role not in ROLES:
            return f"unknown role {role!r}", 0
        content = msg.get("content")
        if role == "assistant" and content is None and msg.get("tool_calls"):
            content = json.dumps(msg["tool_calls"])
        if not isinstance(content, str):
            return f"{role} content is not a string", 0
        if not content.strip():
            return f"empty {role} content", 0
        if "weight" in msg and msg["weight"] not in (0, 1):
            return "weight must be 0 or 1", 0
        roles.append(role)
        tokens += count_tokens(content) + MESSAGE_OVERHEAD_TOKENS
    if "user" not in roles:
        return "no user message", tokens
    if roles[-1] != "assistant":
        return "last message is not from the assistant", tokens
    if tokens > max_tokens:
        return f"over {max_tokens} tokens", tokens
    return None, tokens


def validate_chat_lines(
    lines: Iterable[str],
    *,
    min_examples: int = 10,
    max_tokens_per_example: int = 65_536,
    count_tokens: Callable[[str], int] = estimate_tokens,
    max_samples: int = 5,
) -> ChatValidation:
    """Check every line; the result counts valid examples and errors by reason."""
    report = ChatValidation()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report.examples += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            problem, tokens = "not valid JSON", 0
        else:
            problem, tokens = _example_problem(obj, count_tokens, max_tokens_per_example)
        report.tokens += tokens
        report.max_example_tokens = max(report.max_example_tokens, tokens)
        if problem:
            report.errors[problem] += 1
            if len(report.samples) < max_samples:
                report.samples.append({"line": lineno, "reason": problem})
        else:
            report.valid += 1
    if report.valid < min_examples:
        report.errors[f"fewer than {min_examples} valid examples"] += 1
    return report
