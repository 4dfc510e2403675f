"""Chat mode (issue 4): template renderings, thinking / non-thinking, the thinking budget, stop
conditions, streaming, batches and sessions, on tiny random-weight models with the real tokenizer."""

import json

import pytest

import qwen3rs
from conftest import FIXTURES

BUNDLED = qwen3rs._model.BUNDLED_TOKENIZER_DIR
BUDGET_TEXT = ("\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
               "directly now.\n</think>\n\n")


@pytest.fixture(scope="module")
def tok():
    return qwen3rs.Tokenizer.from_pretrained(BUNDLED)


@pytest.fixture(scope="module")
def model():
    return qwen3rs.load(f"dummy:{FIXTURES / 'tiny_qwen3' / 'config.json'}", device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def moe():
    return qwen3rs.load(f"dummy:{FIXTURES / 'tiny_qwen3' / 'moe_config.json'}", device="cpu", progress=False)


def chat_cases():
    with open(FIXTURES / "tokenizer" / "chat.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("case", chat_cases(), ids=lambda c: f"{len(c['messages'])}msg-gen{c['add_generation_prompt']}-think{c['enable_thinking']}")
def test_chat_template_matches_transformers(tok, case):
    text = tok.apply_chat_template(case["messages"], tools=case.get("tools"), add_generation_prompt=case["add_generation_prompt"],
                                   enable_thinking=case["enable_thinking"])
    assert text == case["text"]
    assert tok.encode(text) == case["ids"]


def test_template_errors_are_exceptions(tok):
    with pytest.raises(ValueError):
        tok.apply_chat_template("not a list")
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": object()}])


def test_no_think_renders_empty_think_block_and_gives_no_thinking(model):
    out = model.generate("Hello", think=False, max_new_tokens=8, seed=1)
    prompt = model.tokenizer.decode(out.prompt_token_ids)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert out.thinking == "" and out.usage["thinking_tokens"] == 0
    assert out.content == out.text


def test_think_prompt_has_no_think_block(model):
    out = model.generate("Hello", think=True, max_new_tokens=4, seed=1)
    assert model.tokenizer.decode(out.prompt_token_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("budget", [0, 1, 7, 20])
def test_thinking_budget_is_never_exceeded(model, budget):
    out = model.generate("Think hard", think=True, thinking_budget=budget, max_new_tokens=budget + 60, seed=2, ignore_eos=True)
    forced = model.tokenizer.encode(BUDGET_TEXT)
    end = model.tokenizer.token_to_id("</think>")
    # The random model never closes its think block, so the runtime does it after exactly `budget` tokens.
    assert end in out.token_ids
    close = out.token_ids.index(end)
    start = close - forced.index(end)  # where the inserted text begins: right after the sampled thinking
    assert out.token_ids[start : start + len(forced)] == forced
    assert start == budget
    assert BUDGET_TEXT.strip() in out.text
    assert out.usage["thinking_tokens"] == close + 1
    assert "Considering the limited time" in out.thinking and "</think>" not in out.content


def test_unlimited_budget_never_inserts_text(model):
    out = model.generate("Think", think=True, thinking_budget=None, max_new_tokens=40, seed=2, ignore_eos=True)
    assert "Considering the limited time" not in out.text
    assert out.content == "" and out.thinking  # an unclosed think block is all thinking


def test_max_new_tokens_and_length(model):
    out = model.generate("Hi", think=False, max_new_tokens=5, seed=3, ignore_eos=True)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_strings_are_cut_from_the_output(model):
    full = model.generate("Hi", think=False, max_new_tokens=30, temperature=0.0, ignore_eos=True)
    text = full.text
    cut = len(text) // 2
    stop = text[cut : cut + 3]
    assert stop.strip()
    out = model.generate("Hi", think=False, max_new_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop, "never-there"])
    assert out.finish_reason == "stop_string"
    assert out.text == text[: text.index(stop)]
    streamed = list(model.generate("Hi", think=False, max_new_tokens=30, temperature=0.0, ignore_eos=True, stop=stop, stream=True))
    assert "".join(d.text for d in streamed) == out.text


def test_eos_stops_and_ignore_eos_continues(model):
    ref = model.generate("Hi", think=False, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    stop_id = ref.token_ids[4]
    out = model.generate("Hi", think=False, max_new_tokens=12, temperature=0.0, stop_token_ids=[stop_id])
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[: ref.token_ids.index(stop_id) + 1]
    out = model.generate("Hi", think=False, max_new_tokens=12, temperature=0.0, stop_token_ids=[stop_id], ignore_eos=True)
    # ignore_eos drops the eos ids, not the user's stop ids
    assert out.finish_reason == "stop"


def test_seed_determinism(model):
    a = model.generate("Tell me", think=False, max_new_tokens=16, seed=11)
    b = model.generate("Tell me", think=False, max_new_tokens=16, seed=11)
    c = model.generate("Tell me", think=False, max_new_tokens=16, seed=12)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


@pytest.mark.parametrize("think", [True, False])
def test_stream_equals_non_stream(model, think):
    kw = dict(think=think, max_new_tokens=40, seed=5, thinking_budget=10, ignore_eos=True)
    ref = model.generate("Stream me", **kw)
    s = model.generate("Stream me", stream=True, **kw)
    deltas = list(s)
    assert "".join(d.text for d in deltas) == ref.text
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert s.completion.token_ids == ref.token_ids and s.completion.text == ref.text
    kinds = [d.kind for d in deltas]
    assert kinds == sorted(kinds, key=lambda k: k != "thinking")  # thinking deltas come first
    assert "".join(d.text for d in deltas if d.kind == "thinking").endswith("</think>") == think
    if not think:
        assert set(kinds) == {"content"}


def test_batch_equals_one_by_one(model, moe):
    prompts = ["One", "A longer second prompt here", [{"role": "user", "content": "Three"}]]
    for m in (model, moe):
        kw = dict(think=False, max_new_tokens=10, temperature=0.0, ignore_eos=True)
        batch = m.generate(prompts, **kw)
        assert isinstance(batch, list) and len(batch) == 3
        assert [b.token_ids for b in batch] == [m.generate(p, **kw).token_ids for p in prompts]


def test_batch_larger_than_max_batch_runs_in_waves():
    m = qwen3rs.load(f"dummy:{FIXTURES / 'tiny_qwen3' / 'config.json'}", device="cpu", dtype="float32", max_batch=2,
                     max_seq_len=64, progress=False)
    prompts = [f"prompt number {i}" for i in range(5)]
    kw = dict(think=False, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    batch = m.generate(prompts, **kw)
    assert [b.token_ids for b in batch] == [m.generate(p, **kw).token_ids for p in prompts]
    streamed = list(m.generate(prompts, stream=True, **kw))
    assert {d.index for d in streamed} == set(range(5))


def test_session_reuses_cache_and_equals_fresh_prefill(model):
    kw = dict(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    with model.chat(system="You are terse.", think=False, **kw) as chat:
        first = chat.send("Hello")
        assert first.usage["cached_tokens"] == 0
        cached_after_first = chat.cached_tokens
        assert cached_after_first == len(first.prompt_token_ids) + len(first.token_ids) - 1
        second = chat.send("And again")
        # Only what the re-rendered history changed and the new turn are prefilled.
        assert 0 < second.usage["cached_tokens"] <= cached_after_first
        fresh = model.generate(chat.messages[:-1], think=False, **kw)
        assert fresh.prompt_token_ids == second.prompt_token_ids
        assert fresh.token_ids == second.token_ids
        assert len(chat.messages) == 5
    with pytest.raises(qwen3rs.InvalidArgumentError, match="closed"):
        chat.send("after close")


def test_session_with_thinking_drops_earlier_reasoning(model):
    with model.chat(think=True, max_new_tokens=20, thinking_budget=4, seed=1, ignore_eos=True) as chat:
        first = chat.send("Hi")
        assert chat.messages[-1]["reasoning_content"] == first.thinking
        second = chat.send("More")
        prompt = model.tokenizer.decode(second.prompt_token_ids)
        assert first.thinking not in prompt  # the template drops earlier turns' reasoning
        assert second.usage["cached_tokens"] > 0


def test_default_sampling_differs_by_mode(model):
    # think=False uses Qwen's non-thinking recommendation, so it samples (not greedy) by default.
    a = model.generate("x", think=False, max_new_tokens=12, seed=1, ignore_eos=True)
    g = model.generate("x", think=False, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert a.token_ids != g.token_ids


def test_logprobs(model):
    out = model.generate("x", think=False, max_new_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
    assert len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp["top"][0]["token_id"] == tok and len(lp["top"]) == 3
        assert lp["logprob"] <= 0 and lp["top"][0]["logprob"] >= lp["top"][1]["logprob"]


@pytest.mark.parametrize("kw", [
    {"temperature": -0.5}, {"top_p": 0}, {"top_k": -1}, {"min_p": 1.5}, {"thinking_budget": -1},
    {"max_new_tokens": 0}, {"stop": [3]}, {"think": "yes"}, {"seed": 1.5}, {"presence_penalty": 5.0},
])
def test_invalid_generation_arguments(model, kw):
    with pytest.raises(ValueError):
        model.generate("x", **kw)


def test_bad_prompts(model):
    with pytest.raises(ValueError):
        model.generate([], think=False)
    with pytest.raises(ValueError):
        model.generate(42)
    with pytest.raises(ValueError):
        model.generate([{"role": "user"}], max_new_tokens=2)  # no content


def test_generate_accepts_a_model_spec():
    out = qwen3rs.generate(f"dummy:{FIXTURES / 'tiny_qwen3' / 'config.json'}", "Hi", think=False, max_new_tokens=3)
    assert len(out.token_ids) <= 3
