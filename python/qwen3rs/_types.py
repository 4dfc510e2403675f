"""Result types: `Completion` (one finished generation) and `Delta` (one streamed piece)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class Completion:
    """One finished generation."""

    text: str = ""
    """All generated text (thinking included), special tokens dropped."""
    thinking: str = ""
    """The text inside <think>…</think>; "" when the model did not think."""
    content: str = ""
    """The answer: the text after the think block, tool-call blocks removed."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Parsed <tool_call> blocks: {"name": str, "arguments": dict}."""
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length", "stop_string"] = "length"
    usage: dict[str, int] = field(default_factory=dict)
    """prompt_tokens, completion_tokens, thinking_tokens (up to and including </think>), cached_tokens
    (prompt tokens a chat session reused from its KV cache instead of prefilling)."""
    timings: dict[str, float] = field(default_factory=dict)
    """prefill_s, decode_s, prefill_tok_s, decode_tok_s."""
    logprobs: list[dict[str, Any]] | None = None

    def __str__(self) -> str:
        return self.content


@dataclass
class Delta:
    """One streamed piece of a generation."""

    kind: Literal["thinking", "content"]
    text: str
    token_ids: list[int]
    index: int = 0
    """Which prompt of a batch this piece belongs to."""
