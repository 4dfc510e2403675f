//! Kernel sources and their compilation: each `kernels/*.cu` (with `common.cuh` in front) is
//! compiled by NVRTC to a cubin for one dtype and one architecture, on first use. Cubins are
//! cached on disk under `$QWEN3RS_CACHE_DIR`, `$XDG_CACHE_HOME/qwen3rs` or `~/.cache/qwen3rs`,
//! keyed by a hash of the source, the options, the architecture and the NVRTC and driver versions,
//! so a second process loads them in milliseconds. A failed cache write is ignored.

use super::libs;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::nvrtc::sys as nv;
use std::ffi::{CStr, CString};
use std::path::PathBuf;

const COMMON: &str = include_str!("kernels/common.cuh");

/// (module name, source) of every kernel file.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("kernels/elementwise.cu")),
    ("norm", include_str!("kernels/norm.cu")),
    ("attention", include_str!("kernels/attention.cu")),
    ("attention_prefill", include_str!("kernels/attention_prefill.cu")),
    ("matmul", include_str!("kernels/matmul.cu")),
    // The decode GEMVs again with 16 loads a lane in flight instead of 8, and with 4, for the row
    // lengths where that measured faster (mod.rs WIDE_ROWS, NARROW_ROWS). A GV_UNROLL of
    // QWEN3RS_CUDA_DEFINES applies to every build.
    ("matmul_wide", concat!("#ifndef GV_UNROLL\n#define GV_UNROLL 16\n#endif\n", include_str!("kernels/matmul.cu"))),
    ("matmul_narrow", concat!("#ifndef GV_UNROLL\n#define GV_UNROLL 4\n#endif\n", include_str!("kernels/matmul.cu"))),
    ("moe", include_str!("kernels/moe.cu")),
    ("expert_gemm", include_str!("kernels/expert_gemm.cu")),
];

/// Kernel constants a tuning run may set without rebuilding the wheel, through
/// `QWEN3RS_CUDA_DEFINES="GV_UNROLL=4 MD_SLOTS=4"` (space- or comma-separated): only these
/// (none has a copy on the host that would have to agree), only positive integers. Each is
/// `#ifndef`-guarded where the kernels define it; the values are part of the cubin cache key.
pub const TUNABLE: &[&str] = &[
    "GV_UNROLL",
    "GV_PAIR_ROWS",
    "GV_MIN_BLOCKS",
    "RD_UNROLL",
    "MD_SLOTS",
    "MD_WPO",
    "AD_KB",
    "AD_MIN_BLOCKS",
    "AD_WARPS",
    "AD_BARRIER_RELAXED",
    "AD_STORES",
    "AD_MERGE_STEP",
    "LD_NC",
    "ARGMAX_UNROLL",
    "EG_MAX_STAGES",
    "EG_MMA_SERIAL",
    "OR_STRIDE",
    "BLOCK_TIMELINE",
];

/// The `-D` options `QWEN3RS_CUDA_DEFINES` asks for (none when unset), or an error naming the bad entry.
pub fn tuning_defines() -> Result<Vec<String>> {
    let spec = std::env::var("QWEN3RS_CUDA_DEFINES").unwrap_or_default();
    spec.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (name, value) = t.split_once('=').unwrap_or((t, ""));
            crate::ensure!(
                TUNABLE.contains(&name),
                InvalidArgument,
                "QWEN3RS_CUDA_DEFINES: {name:?} is not a tunable kernel constant (one of {})",
                TUNABLE.join(", ")
            );
            crate::ensure!(
                value.bytes().all(|b| b.is_ascii_digit()) && value.parse::<u32>().is_ok_and(|v| v > 0),
                InvalidArgument,
                "QWEN3RS_CUDA_DEFINES: {name}={value:?} is not a positive integer"
            );
            Ok(format!("-D{name}={value}"))
        })
        .collect()
}

/// The value of `Q_DTYPE` the kernels are specialised for.
fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// 128-bit FNV-1a (two 64-bit lanes with different offsets): stable across builds, unlike std's hasher.
fn fnv128(parts: &[&[u8]]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for part in parts {
        for &byte in part.iter().chain(b"\x00") {
            a = (a ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
            b = (b ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x9e37);
        }
    }
    format!("{a:016x}{b:016x}")
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("QWEN3RS_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("qwen3rs").join("kernels"))
}

fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (`libs::ensure_nvrtc`); the out-pointers are valid.
    let r = unsafe { nv::nvrtcVersion(&mut major, &mut minor) };
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Device(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

/// Compile one kernel file for `dtype` and compute capability `arch` (e.g. (9, 0)) to a cubin.
fn nvrtc_compile(name: &str, source: &str, options: &[String]) -> Result<Vec<u8>> {
    let src = CString::new(source).map_err(|_| Error::Device("kernel source contains NUL".into()))?;
    let prog_name = CString::new(format!("{name}.cu")).expect("no NUL in a module name");
    let opts: Vec<CString> = options.iter().map(|o| CString::new(o.as_str()).expect("no NUL in an option")).collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
    let check = |r: nv::nvrtcResult, what: &str| -> Result<()> {
        if r == nv::nvrtcResult::NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(Error::Device(format!("NVRTC {what} of {name}.cu failed: {r:?}")))
        }
    };
    // SAFETY: every pointer passed is a live NUL-terminated string or a valid out-pointer; the
    // program is destroyed on every path below.
    unsafe {
        check(nv::nvrtcCreateProgram(&mut prog, src.as_ptr(), prog_name.as_ptr(), 0, std::ptr::null(), std::ptr::null()), "create")?;
        let compiled = nv::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let result = (|| {
            if compiled != nv::nvrtcResult::NVRTC_SUCCESS {
                let mut log_size = 0usize;
                nv::nvrtcGetProgramLogSize(prog, &mut log_size);
                let mut log = vec![0u8; log_size.max(1)];
                nv::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut std::ffi::c_char);
                let log = CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
                return Err(Error::Device(format!("NVRTC could not compile {name}.cu ({compiled:?}):\n{log}")));
            }
            let mut size = 0usize;
            check(nv::nvrtcGetCUBINSize(prog, &mut size), "cubin size")?;
            let mut cubin = vec![0u8; size];
            check(nv::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut std::ffi::c_char), "cubin")?;
            Ok(cubin)
        })();
        nv::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// NVRTC's name for compute capability `arch`: sm_90a on Hopper (its wgmma instructions, which
/// expert_gemm.cu uses; an sm_90a cubin runs only on compute capability 9.0, the device it is built
/// for), sm_XY elsewhere.
fn arch_name(arch: (i32, i32)) -> String {
    let suffix = if arch == (9, 0) { "a" } else { "" };
    format!("sm_{}{}{suffix}", arch.0, arch.1)
}

/// The cubin of module `name` for `dtype` on compute capability `arch`, from the disk cache or
/// freshly compiled. `driver_version` is part of the cache key (0 when no driver is involved).
pub fn cubin(name: &str, dtype: DType, arch: (i32, i32), driver_version: i32, use_cache: bool) -> Result<Vec<u8>> {
    let (_, body) = SOURCES.iter().find(|(n, _)| *n == name).ok_or_else(|| Error::Device(format!("no kernel module {name}")))?;
    let defines = tuning_defines()?;
    libs::ensure_nvrtc()?;
    let include = libs::find_include_dir()?;
    let source = format!("{COMMON}\n#line 1 \"{name}.cu\"\n{body}");
    // What changes the code (the include path doesn't): the cache key.
    let mut code = vec![format!("--gpu-architecture={}", arch_name(arch)), format!("-DQ_DTYPE={}", dtype_code(dtype))];
    code.extend(defines);
    let mut options = code.clone();
    options.extend([format!("-I{}", include.display()), "--std=c++17".to_string(), "-lineinfo".to_string()]);
    let nvrtc = nvrtc_version()?;
    let key = fnv128(&[
        source.as_bytes(),
        code.join(" ").as_bytes(),
        format!("nvrtc {}.{} driver {driver_version}", nvrtc.0, nvrtc.1).as_bytes(),
    ]);
    let path = cache_dir().map(|d| d.join(format!("{name}-{}-sm{}{}-{key}.cubin", dtype.name(), arch.0, arch.1)));
    if use_cache {
        if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()).filter(|b| !b.is_empty()) {
            return Ok(bytes);
        }
    }
    let cubin = nvrtc_compile(name, &source, &options)?;
    if let Some(path) = path.filter(|_| use_cache) {
        if let Some(dir) = path.parent() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&tmp, &cubin)).and_then(|_| std::fs::rename(&tmp, &path));
        }
    }
    Ok(cubin)
}

/// Compile every kernel module for every dtype for `arch` (no GPU needed, only NVRTC and the
/// headers); returns "module/dtype" names. Used by the CI test that runs without a GPU.
pub fn compile_all(arch: (i32, i32)) -> Result<Vec<String>> {
    let mut done = vec![];
    for dtype in [DType::BF16, DType::F32, DType::F16] {
        for (name, _) in SOURCES {
            let bin = cubin(name, dtype, arch, 0, false)?;
            crate::ensure!(!bin.is_empty(), Device, "NVRTC returned an empty cubin for {name}");
            done.push(format!("{name}/{}", dtype.name()));
        }
    }
    Ok(done)
}
