"""`generate()`: argument handling for chat and raw generation. The loop itself runs in Rust."""

from __future__ import annotations

from typing import Any

from ._types import Completion
from .errors import InvalidArgumentError

# Qwen's recommendation for non-thinking mode (model card).
NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _sampling_defaults(model: Any, chat: bool, think: bool) -> dict[str, Any]:
    """Unset sampling values: generation_config.json when thinking (or raw), Qwen's non-thinking
    recommendation when think=False; greedy when the checkpoint says do_sample=false or has none."""
    if chat and not think:
        return dict(NON_THINKING_DEFAULTS)
    gc = model.generation_config
    if not gc.get("do_sample", False):
        return {"temperature": 0.0}
    return {k: gc[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in gc}


def _eos_ids(model: Any) -> list[int]:
    ids = set(model._native.eos_token_ids)
    gc_eos = model.generation_config.get("eos_token_id")
    if isinstance(gc_eos, int):
        ids.add(gc_eos)
    elif isinstance(gc_eos, list):
        ids.update(i for i in gc_eos if isinstance(i, int))
    return sorted(ids)


def _check_ids(ids: Any, what: str) -> list[int]:
    from ._model import _as_id_list

    return _as_id_list(ids, what)


def generate(model: Any, prompt: Any, *, raw: bool = False, think: bool = True, thinking_budget: int | None = 8192,
             tools: list[dict] | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
             presence_penalty: float | None = None, frequency_penalty: float | None = None,
             repetition_penalty: float | None = None, seed: int = 0, stop: list[str] | str | None = None,
             stop_token_ids: list[int] | None = None, ignore_eos: bool = False, stream: bool = False,
             logprobs: int | None = None) -> Any:
    """Generate from `prompt` (see the package docs for every argument)."""
    from ._model import Model, load

    if not isinstance(model, Model):
        model = load(model)
    if not raw:
        raise InvalidArgumentError("chat mode needs the chat template support; pass raw=True for plain completion")
    batch = isinstance(prompt, list) and len(prompt) > 0 and not isinstance(prompt[0], int)
    prompts = prompt if batch else [prompt]
    ids = [_encode_raw(model, p, i) for i, p in enumerate(prompts)]
    user = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
            "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
            "repetition_penalty": repetition_penalty}
    sampling = _sampling_defaults(model, chat=False, think=think)
    sampling.update({k: v for k, v in user.items() if v is not None})
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative int, got {seed!r}")
    stops = [] if ignore_eos else _eos_ids(model)
    stops += _check_ids(stop_token_ids or [], "stop_token_ids")
    if max_new_tokens is None:
        max_new_tokens = max(1, model.max_seq_len - max(len(i) for i in ids))
    elif not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    outs = model._native.generate_ids(ids, max_new_tokens, seed=seed, stop_token_ids=stops, **sampling)
    completions = [_completion(model, p, o) for p, o in zip(ids, outs)]
    return completions if batch else completions[0]


def _encode_raw(model: Any, prompt: Any, index: int) -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InvalidArgumentError("this checkpoint has no tokenizer files: pass token ids (list[int])")
        return model.tokenizer.encode(prompt)
    return _check_ids(prompt, "prompt" if index == 0 else f"prompt {index}")


def _completion(model: Any, prompt_ids: list[int], out: dict[str, Any]) -> Completion:
    tokens = out["token_ids"]
    text = model.tokenizer.decode(tokens, skip_special_tokens=True) if model.tokenizer is not None else ""
    prefill_s, decode_s = out["prefill_s"], out["decode_s"]
    return Completion(
        text=text,
        content=text,
        token_ids=tokens,
        prompt_token_ids=prompt_ids,
        finish_reason=out["finish_reason"],
        usage={"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens), "thinking_tokens": 0},
        timings={
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "prefill_tok_s": len(prompt_ids) / prefill_s if prefill_s > 0 else 0.0,
            "decode_tok_s": (len(tokens) - 1) / decode_s if decode_s > 0 and len(tokens) > 1 else 0.0,
        },
    )
