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


def cuda_home():
    """$CUDA_HOME, else /usr/local/cuda, else the pip wheels' nvidia/cu13 (nvidia-cuda-nvrtc and
    nvidia-cuda-runtime, as .ci/run installs them): the first with a libnvrtc; None without one."""
    import site

    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    homes += [os.path.join(d, "nvidia", "cu13") for d in site.getsitepackages() + [site.getusersitepackages()]]
    return next((h for h in homes if h and glob.glob(os.path.join(h, "lib*", "libnvrtc.so*"))), None)


def nvrtc():
    home = cuda_home()
    if home is None:
        sys.exit("no libnvrtc (set CUDA_HOME; pip install nvidia-cuda-nvrtc gives one)")
    # NVRTC opens its builtins library by name: loaded first from the same folder, it needs no
    # LD_LIBRARY_PATH.
    for b in sorted(glob.glob(os.path.join(home, "lib*", "libnvrtc-builtins.so*")))[:1]:
        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    libs = sorted(glob.glob(os.path.join(home, "lib*", "libnvrtc.so*")))
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


def resources(log):
    """Per kernel of a ptxas log: (name, registers, spill store bytes, spill load bytes, static shared
    memory bytes, stack bytes). ptxas writes "Compiling entry function 'NAME' for 'sm_90'", then "N bytes
    stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers, ... N bytes smem ..."."""
    out = []
    for m in re.finditer(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                         r".*?Used (\d+) registers(?:, used \d+ barriers)?(?:, \d+ bytes cumulative stack size)?(?:, (\d+) bytes smem)?", log, re.S):
        name, stack, st, ld, regs, smem = m.groups()
        out.append((name, int(regs), int(st), int(ld), int(smem or 0), int(stack)))
    return out


def main():
    a = kernel_parser().parse_args()
    lib, include = nvrtc()
    options = build_options(a.arch, a.dtype, a.defines)
    print(f"{'kernel':44} {'regs':>5} {'spill st/ld B':>14} {'static smem':>11} {'stack':>6}")
    for module in MODULES:
        log, _ = compile_module(lib, include, module, options)
        for name, regs, st, ld, smem, stack in resources(log):
            if a.match in name:
                print(f"{name[:44]:44} {regs:>5} {f'{st}/{ld}':>14} {smem:>11} {stack:>6}")


if __name__ == "__main__":
    main()
