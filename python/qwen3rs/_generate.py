"""`generate()` and chat sessions: argument handling, chat rendering and result objects. The generate
loop (sampling, stop conditions, thinking budget, detokenization) runs in Rust."""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from ._model import check_int
from ._types import Completion, Delta
from .errors import InvalidArgumentError


def _is_ids(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in x) and len(x) > 0


def _is_messages(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _split_batch(prompt: Any, raw: bool) -> tuple[list[Any], bool]:
    """(prompts, is_batch): a single prompt is a str, a list of ids (raw) or a list of messages (chat)."""
    if isinstance(prompt, str) or (raw and _is_ids(prompt)) or (not raw and _is_messages(prompt)):
        return [prompt], False
    if hasattr(prompt, "tolist") and raw:  # a numpy array of ids
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and len(prompt) > 0:
        return list(prompt), True
    raise InvalidArgumentError(
        "prompt must be a str, a list of chat messages, or (with raw=True) a list of token ids; "
        f"or a non-empty list of those for a batch (got {type(prompt).__name__} {prompt!r:.60})")


def _encode(model: Any, prompt: Any, raw: bool, think: bool, tools: Any, index: int) -> list[int]:
    from ._model import _as_id_list

    what = "prompt" if index == 0 else f"prompt {index}"
    if raw and not isinstance(prompt, str):
        return _as_id_list(prompt, what)
    if model.tokenizer is None:
        raise InvalidArgumentError("this checkpoint has no tokenizer files: pass token ids with raw=True")
    if raw:
        return model.tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not _is_messages(messages):
        raise InvalidArgumentError(f"{what} must be a str or a list of message dicts, got {prompt!r:.60}")
    text = model.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=think)
    return model.tokenizer.encode(text)


def _eos_ids(model: Any) -> list[int]:
    ids = set(model._native.eos_token_ids)
    gc_eos = model.generation_config.get("eos_token_id")
    for i in gc_eos if isinstance(gc_eos, list) else [gc_eos]:
        if isinstance(i, int) and not isinstance(i, bool):
            ids.add(i)
    if model.tokenizer is not None:  # chat turns end at <|im_end|> even when the config names only <|endoftext|>
        im_end = model.tokenizer.token_to_id("<|im_end|>")
        if im_end is not None:
            ids.add(im_end)
    return sorted(ids)


def _check_float(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InvalidArgumentError(f"{name} must be a number or None, got {value!r}")


def _completion(prompt_ids: list[int], out: dict[str, Any]) -> Completion:
    tokens = out["token_ids"]
    prefill_s, decode_s = out["prefill_s"], out["decode_s"]
    logprobs = None
    if out["logprobs"]:
        logprobs = [{"logprob": lp, "top": [{"token_id": t, "logprob": p} for t, p in top]} for lp, top in out["logprobs"]]
    return Completion(
        text=out["text"],
        thinking=out["thinking"],
        content=out["content"],
        tool_calls=json.loads(out["tool_calls_json"]),
        token_ids=tokens,
        prompt_token_ids=prompt_ids,
        finish_reason=out["finish_reason"],
        usage={"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens), "thinking_tokens": out["thinking_tokens"],
               "cached_tokens": out["cached_tokens"]},
        timings={
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "prefill_tok_s": len(prompt_ids) / prefill_s if prefill_s > 0 else 0.0,
            "decode_tok_s": (len(tokens) - 1) / decode_s if decode_s > 0 and len(tokens) > 1 else 0.0,
        },
        logprobs=logprobs,
    )


class Stream:
    """Iterator of `Delta`s of a running generation. Once exhausted, `.completion` holds the final
    `Completion` (`.completions` for a batch). Dropping it early stops the generation."""

    def __init__(self, native_stream: Any, prompt_ids: list[list[int]], on_done: Any = None):
        self._native = native_stream
        self._prompt_ids = prompt_ids
        self._on_done = on_done
        self.completions: list[Completion] | None = None

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        item = next(self._native, None)
        if item is None:
            if self.completions is None:
                outs = self._native.outputs()
                self.completions = [_completion(p, o) for p, o in zip(self._prompt_ids, outs)]
                if self._on_done is not None:
                    self._on_done(self.completions[0])
            raise StopIteration
        index, kind, text, token_ids = item
        return Delta(kind=kind, text=text, token_ids=token_ids, index=index)

    @property
    def completion(self) -> Completion | None:
        """The final Completion (the first one of a batch), None until the stream is exhausted."""
        return self.completions[0] if self.completions else None


def generate(model: Any, prompt: Any, *, raw: bool = False, think: bool = True, thinking_budget: int | None = 8192,
             tools: list[dict] | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
             presence_penalty: float | None = None, frequency_penalty: float | None = None,
             repetition_penalty: float | None = None, seed: int | None = None, stop: Sequence[str] | str | None = None,
             stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False, stream: bool = False,
             logprobs: int | None = None, _session: int | None = None, _on_done: Any = None) -> Any:
    """Generate from `prompt`.

    prompt: a str (one user message) or a list of chat messages, rendered with the model's chat template;
    with raw=True a str or a list of token ids fed as is. A list of such prompts runs as one batch and
    returns a list of Completions. See README.md for every argument."""
    from ._model import Model, load

    if not isinstance(model, Model):
        model = load(model)
    for name, v in (("raw", raw), ("think", think), ("ignore_eos", ignore_eos), ("stream", stream)):
        if not isinstance(v, bool):
            raise InvalidArgumentError(f"{name} must be True or False, got {v!r}")
    check_int("thinking_budget", thinking_budget, 0)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("top_k", top_k, 0)
    check_int("seed", seed, 0)
    check_int("logprobs", logprobs, 0)
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p), ("presence_penalty", presence_penalty),
                    ("frequency_penalty", frequency_penalty), ("repetition_penalty", repetition_penalty)):
        _check_float(name, v)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise InvalidArgumentError(f"stop must be a str or a list of str, got {stop!r}")

    prompts, batch = _split_batch(prompt, raw)
    ids = [_encode(model, p, raw, think, tools, i) for i, p in enumerate(prompts)]
    stop_ids = ([] if ignore_eos else _eos_ids(model)) + list(stop_token_ids or [])
    if max_new_tokens is None:
        max_new_tokens = max(1, model.max_seq_len - max(len(i) for i in ids))
    if raw and temperature is None and not model.generation_config:
        temperature = 0.0  # no generation_config.json: greedy, as transformers defaults to
    native_out = model._native.generate(
        ids, max_new_tokens, chat=not raw, thinking=(not raw) and think, thinking_budget=thinking_budget,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty, seed=seed, logprobs=logprobs,
        stop=stops, stop_token_ids=stop_ids, session=_session, stream=stream)
    if stream:
        return Stream(native_out, ids, _on_done)
    completions = [_completion(p, o) for p, o in zip(ids, native_out)]
    if _on_done is not None:
        _on_done(completions[0])
    return completions if batch else completions[0]


class ChatSession:
    """A conversation that keeps its KV cache between turns: `send()` renders the whole history with
    the chat template, and only the tokens that differ from what is cached are prefilled."""

    def __init__(self, model: Any, system: str | None = None, think: bool = True, tools: list[dict] | None = None,
                 **defaults: Any):
        self.model = model
        self.think = think
        self.tools = tools
        self.defaults = defaults
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self._id: int | None = model._native.open_session()

    def send(self, text: str | dict[str, Any], **kwargs: Any) -> Any:
        """Add a user message (or any message dict, e.g. a tool response) and generate the reply."""
        if self._id is None:
            raise InvalidArgumentError("this chat session is closed")
        message = {"role": "user", "content": text} if isinstance(text, str) else dict(text)
        options = {"think": self.think, "tools": self.tools, **self.defaults, **kwargs}
        self.messages.append(message)
        try:
            return generate(self.model, list(self.messages), _session=self._id, _on_done=self._record, **options)
        except BaseException:
            self.messages.pop()
            raise

    def _record(self, out: Completion) -> None:
        reply: dict[str, Any] = {"role": "assistant", "content": out.content}
        if out.thinking:
            reply["reasoning_content"] = out.thinking
        if out.tool_calls:
            reply["tool_calls"] = [{"type": "function", "function": c} for c in out.tool_calls]
        self.messages.append(reply)

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation held in the KV cache."""
        return (self.model._native.session_len(self._id) or 0) if self._id is not None else 0

    def close(self) -> None:
        """Free the conversation's KV cache."""
        if self._id is not None:
            self.model._native.close_session(self._id)
            self._id = None

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
