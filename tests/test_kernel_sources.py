"""Static checks of the CUDA kernel sources that hold on every machine (no GPU, no compiler).

Kernels are launched with programmatic dependent launch on sm_90+ (src/backend/cuda/gpu.rs
`launch`): one may start while the kernel ahead of it is still running, so each must call
`grid_dependency()` (common.cuh) before it touches an activation. A kernel that forgot would race
its predecessor only now and then; this check catches it always."""

import re
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "src" / "backend" / "cuda" / "kernels"
DEFINITION = re.compile(r"(__global__[^({;]*?|__device__[^({;]*?)(\w+)(?:##\w+)*\s*\(([^;{}]*)\)\s*\{")


def body(src, open_brace):
    depth = 0
    for i in range(open_brace, len(src)):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            return src[open_brace:i + 1]
    raise AssertionError("unbalanced braces")


def definitions():
    """(is_kernel, name, body) of every kernel and device function in kernels/."""
    for path in sorted(KERNELS.glob("*.cu*")):
        src = re.sub(r"__launch_bounds__\([^)]*\)|\bAD_BOUNDS\((?:[^()]|\([^()]*\))*\)", "", path.read_text())
        for m in DEFINITION.finditer(src):
            yield m.group(1).startswith("__global__"), m.group(2), body(src, m.end() - 1), path.name


def test_every_kernel_waits_for_the_kernel_ahead():
    defs = list(definitions())
    waits = {name for _, name, b, _ in defs if "grid_dependency();" in b}
    kernels = [(name, b, f) for is_kernel, name, b, f in defs if is_kernel]
    assert len(kernels) >= 25, "the kernel parser found too few kernels"
    missing = []
    for name, b, f in kernels:
        called = set(re.findall(r"\b(\w+)\s*(?:<(?:[^;()<>]|\([^()]*\))*>)?\s*\(", b))
        if "grid_dependency" not in called and not called & waits:
            missing.append(f"{f}: {name}")
    assert not missing, f"kernels that never call grid_dependency(): {missing}"


# Functions that wait late on one path: there, before the wait, they read only what the kernel ahead
# cannot have written (host metadata, weights, cache rows of earlier steps), never these activations.
LATE_WAIT = {"attention_decode_impl": ("q", "r.k", "r.v", "out", "part_ml", "part_acc", "kc[", "vc[")}


def test_late_waits_leave_the_activations_alone():
    defs = {name: b for _, name, b, _ in definitions()}
    for name, activations in LATE_WAIT.items():
        b = re.sub(r"//[^\n]*", "", defs[name])
        assert b.count("grid_dependency();") == 2, f"{name}: expected an early and a late wait"
        early = b[1:b.index("grid_dependency();")].strip()
        assert re.fullmatch(r"if \(!\w+\)", early), f"{name}: the early wait must come first, got {early!r}"
        before = b[b.index("grid_dependency();") + 1:b.rindex("grid_dependency();")]
        used = [a for a in activations if re.search(r"(?<![\w.])" + re.escape(a) + (r"\b" if a[-1].isalnum() else ""), before)]
        assert not used, f"{name}: reads {used} before its late grid_dependency()"


# What a function may do before its wait (grid_dependency()): prefetch or load weights (the decode
# products' first batch of weight loads, load_batch of a weight parameter, and their norm weight,
# load_norm_weight, the router's columns), declare, and compute indices from the launch shape. No other memory read.
BEFORE_WAIT = [
    r"(if \([^\[]*\) )?prefetch_lines\(.*",
    r"auto \w+ = \[&\].*",  # a lambda (its body is not checked: those here compute addresses)
    r"(extern )?__shared__ .*",
    r"(const )?(int|bool) \w+ = [^\[]*",  # no indexing: no memory read
    r"(const )?(act_t\*|const act_t\*|int) \w+",  # a declaration
    r"uint4 \w+\[GV_UNROLL\](, \w+\[GV_UNROLL\])*",
    r"(if \(early\) )?load_batch\(\w+, (w|gate|up|router) \+ .*",
    r"const NormW \w+ = load_norm_weight\(nw, \w+\)",
    r"RawND<\d+> \w+",
    r"(if \([^\[]*\) )?\w+ = load_raw<\d+>\(router \+ .*",  # the router's weights (gemv_router_rows)
    r"if \(early\)",
    r'TIMELINE\("\w+"\)',  # profiling builds only: a block's own record (common.cuh Timeline)
]


def statements_before_wait(b):
    """The statements of function body b before its first grid_dependency(), lambda bodies left out."""
    before = re.sub(r"//[^\n]*|^\s*#[^\n]*", "", b[1:b.index("grid_dependency();")], flags=re.M)  # comments, #if lines
    while (m := re.search(r"\[&\][^{;]*\{", before)):
        end = m.end() - 1 + len(body(before, m.end() - 1))
        before = before[:m.end() - 1] + before[end:]
    return [s.strip() for s in re.split(r"[;{}]", before) if s.strip()]


def refused_before_wait(b):
    """The statements before function body b's wait that BEFORE_WAIT does not allow."""
    return [s for s in statements_before_wait(b) if not any(re.fullmatch(p, " ".join(s.split())) for p in BEFORE_WAIT)]


def test_nothing_but_weights_come_before_the_wait():
    for _, name, b, f in definitions():
        if "grid_dependency();" not in b or name == "grid_dependency" or name in LATE_WAIT:
            continue
        bad = refused_before_wait(b)
        assert not bad, f"{f}: {name}: {bad[0]!r} before grid_dependency()"


def test_the_before_wait_check_catches_a_read():
    """The check above refuses an activation read, also inside an if block."""
    b = "{ const int n0 = warp_id_global(); if (early) { float v = x[n0]; } grid_dependency(); }"
    assert refused_before_wait(b) == ["float v = x[n0]"]


# Loads issued before the wait must not take the read-only path: under programmatic dependent launch an
# ld.global.nc (__ldg) is not served until the kernel ahead completes (RESULTS.md run 33.10), which
# would make every early load wait for the kernel it is meant to overlap.
EARLY_LOADERS = ("ld_weight", "load_batch", "load_norm_weight", "load_nd", "load_raw")


def test_early_loads_avoid_the_read_only_path():
    defs = {name: b for _, name, b, _ in definitions()}
    for name in EARLY_LOADERS:
        b = re.sub(r"//[^\n]*", "", defs[name])
        assert "__ldg" not in b and ".nc" not in b, f"{name}: a read-only (.nc) load where loads run before the wait"
        assert "ld_early(" in b or any(f"{other}(" in b for other in EARLY_LOADERS if other != name), f"{name}: loads without ld_early"
    overloads = [b for _, name, b, _ in definitions() if name == "ld_early"]
    assert len(overloads) == 2, "ld_early: expected the 16- and 8-byte forms"
    for b in overloads:
        plain = re.sub(r"//[^\n]*", "", b).split("} else {")[1].split("}")[0]
        assert "ld.global." in plain and ".nc" not in plain, f"ld_early's default form is not a plain load: {plain.strip()}"


def test_the_tunable_names_are_the_kernels_defines():
    """compile.rs TUNABLE (what QWEN3RS_CUDA_DEFINES accepts) names exactly the constants the kernels
    define under `#ifndef NAME  // tunable` (or test with #ifdef): a name left in the list after its
    define went would be accepted and change nothing, a define missing from it could not be swept."""
    rs = (KERNELS.parents[0] / "compile.rs").read_text()
    start = rs.index("pub const TUNABLE")
    names = set(re.findall(r'"(\w+)"', rs[start:rs.index("];", start)]))
    src = "".join(p.read_text() for p in sorted(KERNELS.glob("*.cu*")))
    assert len(names) >= 10, "the TUNABLE parser found too few names"
    undefined = sorted(n for n in names if not re.search(rf"#ifn?def {n}\b", src))
    assert not undefined, f"in compile.rs TUNABLE but defined by no kernel: {undefined}"
    unlisted = sorted(set(re.findall(r"#ifn?def (\w+)\s*// tunable", src)) - names)
    assert not unlisted, f"marked tunable in the kernels but not in compile.rs TUNABLE: {unlisted}"
