"""What the kernels become in SASS, without a GPU (issue 6 tuning): NVRTC compiles the kernel modules
as src/backend/cuda/compile.rs does (ptxas_report.py's code), cuobjdump disassembles them.
    pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm   # 13.2.51 and 13.5.37 were used in run 35.7
    CUDA_HOME=.../nvidia/cu13 python3 benches/profiles/sass_report.py [--match attention_decode] [--dump] [DEFINE=VALUE ...]
Prints, for every kernel, how many of the instructions that order or wait on memory it holds (a cluster
barrier's release is `MEMBAR.ALL.GPU` before `UCGABAR_ARV`: RESULTS.md run 35.7), or with --dump the
whole SASS of the kernels matched."""
import glob
import os
import subprocess
import sys
import tempfile
from collections import Counter

from ptxas_report import MODULES, build_options, compile_module, kernel_parser, nvrtc

WATCH = ["MEMBAR", "ERRBAR", "FENCE", "UCGABAR_ARV", "UCGABAR_WAIT", "CCTL", "SYNCS", "STAS", "BAR.SYNC", "PREEXIT", "ACQBULK"]


def tool(name, env):
    found = sorted(glob.glob(os.path.join(os.path.dirname(sys.executable), "..", "lib", "python3*", "site-packages", "nvidia", "cu*", "bin", name)))
    path = os.environ.get(env) or (found[-1] if found else "")
    if not path:
        sys.exit(f"no {name}: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm (or set {env})")
    return path


def main():
    ap = kernel_parser()
    ap.add_argument("--dump", action="store_true", help="print the matched kernels' SASS")
    a = ap.parse_args()
    cuobjdump = tool("cuobjdump", "CUOBJDUMP")
    nvdisasm = tool("nvdisasm", "NVDISASM")
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    lib, include = nvrtc()
    options = build_options(a.arch, a.dtype, a.defines)
    print(f"{'kernel':44} " + " ".join(f"{w:>12}" for w in WATCH))
    for module in MODULES:
        _, cubin = compile_module(lib, include, module, options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, env=env, check=True).stdout
        # cuobjdump: "Function : NAME", then one instruction a line until the next function.
        for part in sass.split("Function : ")[1:]:
            name, body = part.split("\n", 1)
            name = name.strip()
            if a.match not in name:
                continue
            if a.dump:
                print(f"// {name}\n{body}")
                continue
            ops = Counter(w for line in body.split("\n") if "/*" in line for w in WATCH if w in line.split(";")[0])
            print(f"{name[:44]:44} " + " ".join(f"{ops.get(w, 0):>12}" for w in WATCH))


if __name__ == "__main__":
    main()
