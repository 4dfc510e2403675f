"""Accuracy of quantize="int8" (weight-only, per-row scales) on the conformance checkpoints, against the
transformers reference in tests/fixtures: logits row relative error (prefill) and greedy agreement
(teacher-forced argmax over the reference's greedy continuation, and the free-running prefix that matches).

    python benches/int8_accuracy.py"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import qwen3rs  # noqa: E402
from conftest import CASES, FIXTURES  # noqa: E402


def main():
    print("| case | dtype | weights | logits row err max | mean | teacher-forced greedy agreement | free-running prefix match |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        ref = np.load(FIXTURES / case / "reference.npz")
        n = len([k for k in ref.files if k.startswith("prompt_")])
        for dtype in ["float32", "bfloat16"]:
            for quant in [None, "int8"]:
                m = qwen3rs.load(FIXTURES / case, device="cpu", dtype=dtype, progress=False, quantize=quant)
                errs, agree, total, prefix, gen_total = [], 0, 0, 0, 0
                for i in range(n):
                    prompt, greedy = ref[f"prompt_{i}"].tolist(), ref[f"greedy_{i}"].tolist()
                    out = m.logits(prompt)
                    r = ref[f"prefill_logits_{i}"]
                    errs.extend(np.linalg.norm(out - r, axis=1) / np.linalg.norm(r, axis=1))
                    full = m.logits(prompt + greedy[:-1])[len(prompt) - 1:]
                    agree += int((full.argmax(axis=1) == np.array(greedy)).sum())
                    total += len(greedy)
                    gen = m.generate(prompt, raw=True, max_new_tokens=len(greedy), temperature=0.0, ignore_eos=True).token_ids
                    k = next((j for j, (a, b) in enumerate(zip(gen, greedy)) if a != b), len(greedy))
                    prefix += k
                    gen_total += len(greedy)
                errs = np.array(errs)
                print(f"| {case} | {dtype} | {quant or 'as stored'} | {errs.max():.2e} | {errs.mean():.2e} | "
                      f"{agree}/{total} | {prefix}/{gen_total} |", flush=True)


if __name__ == "__main__":
    main()
