"""Registers, spills and shared memory of every kernel as ptxas builds it, without a GPU (issue 6 tuning):
NVRTC compiles the kernel sources as src/backend/cuda/compile.rs does, with `--ptxas-options=-v`.
    CUDA_HOME=.../nvidia/cu13 python3 benches/profiles/ptxas_report.py [--dtype bf16] [--arch 90a] [--match moe_] [DEFINE=VALUE ...]
DEFINE=VALUE are what QWEN3RS_CUDA_DEFINES would set (a kernel's registers decide how many of its blocks
fit on an SM: 65,536 registers / (threads × registers))."""
import argparse
import ctypes
import glob
import os
import re
import sys

KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src", "backend", "cuda", "kernels")
MODULES = ["elementwise", "norm", "attention", "attention_prefill", "matmul", "moe", "expert_gemm"]


def nvrtc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    libs = sorted(glob.glob(os.path.join(home, "lib*", "libnvrtc.so*")))
    if not libs:
        sys.exit(f"no libnvrtc under {home} (set CUDA_HOME; pip install nvidia-cuda-nvrtc gives one)")
    return ctypes.CDLL(libs[0]), os.path.join(home, "include")


def compile_module(lib, include, module, options):
    """(ptxas log, cubin bytes) of one kernel module, compiled as compile.rs does."""
    common = open(os.path.join(KERNELS, "common.cuh")).read()
    body = open(os.path.join(KERNELS, module + ".cu")).read()
    src = f'{common}\n#line 1 "{module}.cu"\n{body}'.encode()
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{module}.cu".encode(), 0, None, None)
    opts = [o.encode() for o in options + [f"-I{include}", "--std=c++17", "--ptxas-options=-v"]]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = b""
    if rc == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, buf)
        cubin = buf.raw
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if rc != 0:
        sys.exit(f"{module}.cu did not compile:\n{log.value.decode(errors='replace')}")
    return log.value.decode(errors="replace"), cubin


def build_options(arch, dtype, defines):
    return [f"--gpu-architecture=sm_{arch}", f"-DQ_DTYPE={['f32', 'bf16', 'f16'].index(dtype)}"] + [f"-D{d}" for d in defines]


def kernel_parser():
    """The options of a build of the kernels: DEFINE=VALUE ..., --dtype, --arch, --match."""
    ap = argparse.ArgumentParser()
    ap.add_argument("defines", nargs="*")
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--match", default="", help="only kernels whose name contains this")
    return ap


def main():
    a = kernel_parser().parse_args()
    lib, include = nvrtc()
    options = build_options(a.arch, a.dtype, a.defines)
    print(f"{'kernel':44} {'regs':>5} {'spill st/ld B':>14} {'static smem':>11} {'stack':>6}")
    for module in MODULES:
        log, _ = compile_module(lib, include, module, options)
        # ptxas: "Compiling entry function 'NAME' for 'sm_90'", then "N bytes stack frame, N bytes spill
        # stores, N bytes spill loads" and "Used N registers, ... N bytes smem ...".
        for m in re.finditer(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                             r".*?Used (\d+) registers(?:, used \d+ barriers)?(?:, \d+ bytes cumulative stack size)?(?:, (\d+) bytes smem)?", log, re.S):
            name, stack, st, ld, regs, smem = m.groups()
            if a.match in name:
                print(f"{name[:44]:44} {regs:>5} {st + '/' + ld:>14} {smem or '0':>11} {stack:>6}")


if __name__ == "__main__":
    main()
