"""benches/profiles/block_timeline.py's reading of a timeline (no GPU: a synthetic CSV of two decode
steps, in the format gpu.rs `block_timeline` writes)."""

import csv
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("block_timeline", ROOT / "benches/profiles/block_timeline.py")
bt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bt)

US = 1000  # ns


def rec(module, kernel, block, grid, t0, wait, end, marks=(0, 0, 0, 0)):
    return dict(module=module, kernel=kernel, block=block, grid=grid, smid=block % 3, t0=t0, wait=wait, end=end,
                m0=marks[0], m1=marks[1], m2=marks[2], m3=marks[3])


def step(t):
    """One step at time t (ns): embed, then gemv3_t1_xs twice in a row (a layer each: 4 blocks), each
    followed by an attention whose 2 blocks enter 2 µs before it ends, then argmax_rows."""
    rows = [rec("elementwise", "embed", 0, 1, t, t + 100, t + 1 * US)]
    t += 1 * US
    for _ in range(2):
        rows += [rec("matmul", "gemv3_t1_xs", b, 4, t + 100, t + 1 * US, t + (5 + b) * US, (t + 2 * US, 0, 0, 0)) for b in range(4)]
        end = t + 8 * US  # the last gemv3 block's exit
        rows += [rec("attention", "attention_decode_rope_g2_d128", b, 2, end - 2 * US, end + US // 2, end + 4 * US,
                     (end + US, end + 2 * US, end + 3 * US, 0)) for b in range(2)]
        t = end + 4 * US
    rows.append(rec("elementwise", "argmax_rows", 0, 1, t + 100, t + US, t + 3 * US))
    return rows, t + 3 * US


def two_steps():
    rows, t = step(0)
    more, _ = step(t + 10 * US)
    return rows + more


def write(tmp_path, rows=None):
    path = tmp_path / "timeline.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["module", "kernel", *bt.FIELDS])
        w.writeheader()
        w.writerows(rows or two_steps())
    return path


def test_launches_split_where_a_block_repeats(tmp_path):
    rows, _ = step(0)
    names = [(l["name"], len(l["blocks"])) for l in bt.launches(rows)]
    assert names == [("embed", 1), ("gemv3_t1_xs", 4), ("attention_decode_rope_g2_d128", 2), ("gemv3_t1_xs", 4),
                     ("attention_decode_rope_g2_d128", 2), ("argmax_rows", 1)]


def test_analyse_reports_each_kernel_against_the_one_ahead(tmp_path, capsys):
    bt.analyse(write(tmp_path))
    out = capsys.readouterr().out
    assert "decode step: 6 instrumented launches, 28.0 µs" in out, out  # embed 0 µs to argmax 28 µs
    line = next(l for l in out.splitlines() if l.startswith("attention_decode_rope_g2_d128 (after gemv3_t1_xs)"))
    # 2 launches, 2 blocks on 2 SMs, both entered 2 µs before gemv3 ended; waits at +0.5, exits at +4.
    assert line.split()[3:10] == ["2", "2", "2", "2", "-2.00/-2.00", "0.50/0.50", "4.00/4.00/4.00/4.00/4.00"], line
    marks = next(l for l in out.splitlines() if l.strip().startswith("attention_decode_rope_g2_d128") and "after" not in l)
    assert marks.split()[1:] == ["0.50", "1.50", "2.50", "-", "3.50"], marks  # µs after each block's wait
    # gemv3 after the attention: its last block exits 8 µs after the attention's last exit.
    line = next(l for l in out.splitlines() if l.startswith("gemv3_t1_xs (after attention"))
    assert line.split()[-1].endswith("/8.00"), line


def test_the_attention_by_split(tmp_path, capsys):
    """--plane 1: each of the attention's 2 blocks is a split; split 1 (the step's own key) sums its
    keys 1 µs later than split 0 in every launch."""
    rows = two_steps()
    for r in rows:
        if r["kernel"].startswith("attention") and r["block"] == 1:
            r["m1"] += US
    bt.analyse(write(tmp_path, rows), plane=1)
    out = capsys.readouterr().out.split("by split")[1].splitlines()
    got = [l.split() for l in out if l.strip()[:1].isdigit()]
    assert got == [["0", "1.00", "2.00", "3.00", "-", "4.00"], ["1", "1.00", "3.00", "3.00", "-", "4.00"]], out
