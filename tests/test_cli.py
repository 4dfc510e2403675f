"""The command line (`python -m qwen3rs`), run as a user would, on a tiny dummy model."""

import json
import subprocess
import sys

from conftest import FIXTURES

TINY = f"dummy:{FIXTURES / 'tiny_qwen3' / 'config.json'}"


def run(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "qwen3rs", *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_generate_prints_text_and_stats():
    r = run("generate", "--model", TINY, "--no-think", "--max-new-tokens", "6", "--seed", "1", "Hello there")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "decode" in r.stderr and "tok/s" in r.stderr


def test_bench_json():
    r = run("bench", "--model", TINY, "--prompt-len", "16", "--new-tokens", "4", "--batch", "2", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["batch"] == 2 and result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0


def test_chat_switches_modes_and_exits():
    r = run("chat", "--model", TINY, "--max-new-tokens", "6", "--thinking-budget", "2", stdin="hi\n/no_think\nhello\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "(thinking off)" in r.stdout
    assert r.stdout.count(" decode ") == 2  # one stats line per answer
    assert "Considering" in r.stdout  # the budget of 2 ran out in the first (thinking) answer


def test_errors_are_one_line_not_tracebacks():
    r = run("generate", "--model", "/no/such/folder", "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("qwen3rs: error:") and "Traceback" not in r.stderr
    r = run("generate", "--model", TINY, "--device", "tpu", "hi")
    assert r.returncode == 2 and "device" in r.stderr
