"""qwen3rs.Tokenizer against HF `tokenizers` (the oracle only): the conformance fixture, property
tests on random text, bad input, and long pathological input."""

import json
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen3rs
from qwen3rs import CheckpointNotFoundError, InvalidArgumentError, TokenizerError

hf_tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "python" / "qwen3rs" / "tokenizer"
FIXTURE = ROOT / "tests" / "fixtures" / "tokenizer" / "encode.jsonl"

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
    return qwen3rs.Tokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def hf():
    return hf_tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def cases():
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


# Module-level copies for hypothesis tests (function-scoped fixtures don't mix with @given).
TOK = qwen3rs.Tokenizer.from_pretrained(TOKENIZER_DIR)
HF = hf_tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
ADDED = [t["content"] for t in json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())["added_tokens"]]


HF_NFC = hf_tokenizers.normalizers.NFC()


def _has_post_unicode9_pair(text):
    return HF_NFC.normalize_str(text) != unicodedata.normalize("NFC", text)


def hf_ids(text):
    return HF.encode(text, add_special_tokens=False).ids


# ---- conformance fixture ---------------------------------------------------------------------


def test_fixture_ids_identical(tok, cases):
    assert len(cases) > 300
    bad = [c["text"] for c in cases if tok.encode(c["text"]) != c["ids"]]
    assert not bad, f"{len(bad)}/{len(cases)} lines differ, first: {bad[:3]!r}"


def test_fixture_decode_matches_hf(tok, hf, cases):
    for c in cases:
        for skip in (False, True):
            assert tok.decode(c["ids"], skip_special_tokens=skip) == hf.decode(c["ids"], skip_special_tokens=skip)


def test_encode_batch_matches_encode(tok, cases):
    texts = [c["text"] for c in cases]
    assert tok.encode_batch(texts) == [c["ids"] for c in cases]
    assert tok.encode_batch([]) == []


def test_add_special_tokens_like_hf(tok, hf):
    for text in ["hi", "", "<|im_start|>user\nhello<|im_end|>"]:
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True).ids


# ---- vocabulary ------------------------------------------------------------------------------


def test_vocab(tok, hf):
    assert tok.vocab_size == 151669 == hf.get_vocab_size(with_added_tokens=True)
    for i in list(range(0, 151669, 997)) + list(range(151640, 151669)):
        token = hf.id_to_token(i)
        assert tok.id_to_token(i) == token
        assert tok.token_to_id(token) == hf.token_to_id(token)
    assert tok.id_to_token(151669) is None and tok.id_to_token(-1) is None
    assert tok.token_to_id("no such token, surely") is None


def test_added_tokens_not_special_still_matched(tok, hf):
    text = "<think>\nplan</think>\n<tool_call>{}</tool_call><|im_end|>"
    ids = tok.encode(text)
    assert ids == hf_ids(text)
    assert tok.token_to_id("<think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert "<think>" in tok.decode(ids, skip_special_tokens=True)  # added, not special: kept
    assert "<|im_end|>" not in tok.decode(ids, skip_special_tokens=True)


# ---- property tests against HF ---------------------------------------------------------------

WHITESPACE = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2009\u200a\u2028\u2029\u202f\u205f\u3000\x1c\u200b"
DIGITS = "0123456789٠١٢٣൧௮½²⅓Ⅻ"
PUNCT = "'\"!?.,;:-_()[]{}<>|/\\@#$%^&*+=~`"
CONTRACTION = "'sStTrReEvVmMlLdDſ"

texts = st.text(max_size=60)
runs = st.text(alphabet=WHITESPACE + DIGITS + PUNCT + CONTRACTION + "aZé中👍", max_size=60)
with_added = st.lists(st.one_of(st.text(max_size=12), runs, st.sampled_from(ADDED)), max_size=8).map("".join)


@PROPERTY
@given(texts)
def test_random_unicode_matches_hf(text):
    assert TOK.encode(text) == hf_ids(text)


@PROPERTY
@given(runs)
def test_whitespace_digit_punct_runs_match_hf(text):
    assert TOK.encode(text) == hf_ids(text)


@PROPERTY
@given(with_added)
def test_embedded_added_tokens_match_hf(text):
    assert TOK.encode(text) == hf_ids(text)


@PROPERTY
@given(st.one_of(texts, with_added))
def test_round_trip_is_nfc(text):
    # NFC as HF defines it (Unicode 9.0 tables); Python's unicodedata is a newer Unicode and
    # composes a few later-added pairs (e.g. U+11935 U+11930) that HF leaves alone.
    ids = TOK.encode(text)
    assert TOK.decode(ids) == HF_NFC.normalize_str(text) == HF.decode(ids, skip_special_tokens=False)
    assert TOK.decode(ids) == unicodedata.normalize("NFC", text) or _has_post_unicode9_pair(text)


@PROPERTY
@given(st.lists(st.integers(0, 151668), max_size=20), st.booleans())
def test_decode_arbitrary_ids_matches_hf(ids, skip):
    # Arbitrary ids split characters anywhere: lossy decode must replace exactly as HF does.
    assert TOK.decode(ids, skip_special_tokens=skip) == HF.decode(ids, skip_special_tokens=skip)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [[151669], [10**9], [-1], [2**32], [1, 2, 10**12]])
def test_decode_invalid_ids_raise(tok, ids):
    with pytest.raises(InvalidArgumentError):
        tok.decode(ids)


@pytest.mark.parametrize("text", ["\ud800", "abc\udfffdef", "\udc80"])
def test_lone_surrogates_raise(tok, text):
    with pytest.raises(TokenizerError):
        tok.encode(text)
    with pytest.raises(TokenizerError):
        tok.encode_batch(["fine", text])


def test_wrong_types_raise_type_error(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.decode(["a"])


def _real_json():
    return json.loads((TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))


def _mutated(fn):
    data = _real_json()
    fn(data)
    return data


BAD_JSON = {
    "not json": "{",
    "empty object": "{}",
    "truncated": (TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8")[:5000],
    "vocab not a map": json.dumps({"model": {"vocab": [], "merges": []}}),
    "nfkc": _mutated(lambda d: d.update(normalizer={"type": "NFKC"})),
    "other pattern": _mutated(lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\s+")),
    "wordpiece": _mutated(lambda d: d["model"].update(type="WordPiece")),
    "merge out of vocab": _mutated(lambda d: d["model"]["merges"].__setitem__(0, ["Ġ", "zzzq"])),
    "bad merge shape": _mutated(lambda d: d["model"]["merges"].__setitem__(0, 5)),
    "negative id": _mutated(lambda d: d["model"]["vocab"].update({"Ġ": -3})),
    "lstrip token": _mutated(lambda d: d["added_tokens"][0].update(lstrip=True)),
    "template post-processor": _mutated(lambda d: d.update(post_processor={"type": "TemplateProcessing"})),
    "dropout": _mutated(lambda d: d["model"].update(dropout=0.1)),
}


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_malformed_or_unsupported_json_raises(tmp_path, name):
    content = BAD_JSON[name]
    path = tmp_path / "tokenizer.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        qwen3rs.Tokenizer.from_file(path)
    assert str(path) in str(info.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        qwen3rs.Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(CheckpointNotFoundError):
        qwen3rs.Tokenizer.from_pretrained(tmp_path)


# ---- pathological input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("abcdefghij" * 100_000, id="1MB-letters"),
        pytest.param("x+" * 500_000, id="1MB-punct"),
        pytest.param("👍" * 100_000, id="100k-emoji"),
        pytest.param("\u3000" * 300_000 + "a", id="wide-spaces"),
    ],
)
def test_long_input_linear_time_and_exact(tok, text):
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{elapsed:.2f}s for {len(text.encode())} bytes"
    assert tok.decode(ids) == text


@pytest.mark.parametrize("ch", ["\U0001611e", "\U000113c2", "\U00016d67", "\U00011935\U00011930"])
def test_compositions_newer_than_hf_nfc(tok, ch):
    # Pairs that NFC composes only since Unicode 13/16: HF's normalizer leaves them, so must we.
    text = f"a{ch}{ch}b"
    assert tok.encode(text) == hf_ids(text)


def test_long_emoji_matches_hf(tok):
    text = "👍" * 20_000 + "🏳️‍🌈" * 5_000
    assert tok.encode(text) == hf_ids(text)


def test_linear_scaling(tok):
    """Doubling a no-space input must not come near quadrupling the time."""

    def best(text):
        return min(_timed(lambda: tok.encode(text)) for _ in range(3))

    small, large = best("😀" * 50_000), best("😀" * 200_000)
    assert large < 4 * small * 2.0, f"50k: {small:.3f}s, 200k: {large:.3f}s"


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
