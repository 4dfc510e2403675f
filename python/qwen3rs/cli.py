"""The `qwen3rs` command line: `chat` (interactive, streaming), `generate` (one prompt) and `bench`
(prefill and decode tokens/s). `python -m qwen3rs ...` is the same."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

DEFAULT_MODEL = "dummy:Qwen3-0.6B"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def _style(text: str, code: str, enabled: bool) -> str:
    return f"{code}{text}{RESET}" if enabled and text else text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"checkpoint folder, Hugging Face repo id, or dummy:NAME (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help='"auto", "cpu", "cuda" or "cuda:N" (default auto)')
    p.add_argument("--dtype", default="auto", help='"auto", "bfloat16", "float16" or "float32"')
    p.add_argument("--max-seq-len", type=int, default=None, help="KV-cache capacity per sequence")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-think", action="store_true", help="non-thinking mode (enable_thinking=False)")
    p.add_argument("--thinking-budget", type=int, default=8192, help="max thinking tokens (default 8192; -1 = unlimited)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    kw = {"thinking_budget": None if args.thinking_budget < 0 else args.thinking_budget,
          "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
          "top_k": args.top_k, "seed": args.seed}
    return {k: v for k, v in kw.items() if v is not None or k == "thinking_budget"}


def _load(args: argparse.Namespace):
    import qwen3rs

    return qwen3rs.load(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len, progress=True)


def _print_stream(stream: Any, color: bool) -> Any:
    """Print deltas as they come (thinking dimmed); returns the final Completion."""
    kind = None
    for d in stream:
        if d.kind != kind and kind == "thinking":
            sys.stdout.write("\n")
        kind = d.kind
        sys.stdout.write(_style(d.text, DIM, color) if d.kind == "thinking" else d.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return stream.completion


def _stats(out: Any) -> str:
    t, u = out.timings, out.usage
    return (f"[{u['completion_tokens']} tokens ({u['thinking_tokens']} thinking), prefill {t['prefill_tok_s']:.1f} tok/s, "
            f"decode {t['decode_tok_s']:.1f} tok/s, {out.finish_reason}]")


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    color = sys.stdout.isatty()
    think = not args.no_think
    session = model.chat(system=args.system, think=think, **_sampling(args))
    print(f"{model!r}\nType a message; /think or /no_think switches mode, /reset starts over, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text in ("/think", "/no_think"):
            session.think = text == "/think"
            print(f"(thinking {'on' if session.think else 'off'})")
            continue
        if text == "/reset":
            session.close()
            session = model.chat(system=args.system, think=session.think, **_sampling(args))
            print("(new conversation)")
            continue
        try:
            out = _print_stream(session.send(text, stream=True), color)
        except KeyboardInterrupt:
            print("\n(interrupted)")
            continue
        print(_style(_stats(out), DIM, color))


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
    stream = model.generate(prompt if args.raw else messages, raw=args.raw, think=not args.no_think, stream=True, **_sampling(args))
    out = _print_stream(stream, sys.stdout.isatty())
    print(_style(_stats(out), DIM, sys.stderr.isatty()), file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    model = _load(args)
    vocab = min(model.config["vocab_size"], 150000)
    prompts = [[(i * 7919 + b * 104729) % (vocab - 10) + 10 for i in range(args.prompt_len)] for b in range(args.batch)]
    kw = dict(raw=True, temperature=0.0, ignore_eos=True)
    model.generate(prompts if args.batch > 1 else prompts[0], max_new_tokens=2, **kw)  # warm-up
    t0 = time.perf_counter()
    outs = model.generate(prompts, max_new_tokens=args.new_tokens, **kw)
    total = time.perf_counter() - t0
    prefill_s = max(o.timings["prefill_s"] for o in outs)
    decode_s = max(o.timings["decode_s"] for o in outs)
    result = {
        "model": args.model, "device": model.device, "dtype": model.dtype, "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "prefill_tok_s": args.batch * args.prompt_len / prefill_s if prefill_s else 0.0,
        "decode_tok_s": args.batch * (args.new_tokens - 1) / decode_s if decode_s else 0.0,
        "total_s": total,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} on {model.device} ({model.dtype}), batch {args.batch}: "
              f"prefill {result['prefill_tok_s']:.1f} tok/s ({args.prompt_len} tokens), "
              f"decode {result['decode_tok_s']:.1f} tok/s ({args.new_tokens} tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3rs", description="Run Qwen3 models from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="interactive chat (streams; thinking shown dimmed)")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    gen = sub.add_parser("generate", help="generate a reply to one prompt (argument or stdin)")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.set_defaults(func=cmd_generate)
    bench = sub.add_parser("bench", help="prefill and decode tokens/s")
    _add_model_args(bench)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import Qwen3Error

    try:
        return args.func(args)
    except (Qwen3Error, ValueError, FileNotFoundError) as e:
        print(f"qwen3rs: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
