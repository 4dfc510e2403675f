//! Finding the CUDA libraries and headers before cudarc touches them. cudarc loads libcuda /
//! libnvrtc / libcublas by bare name and panics when one is missing, so we look for each one
//! ourselves (LD_LIBRARY_PATH, CUDA_HOME/CUDA_PATH, /usr/local/cuda, the pip `nvidia/cu13` folders
//! Python tells us about), load it by full path and keep it loaded: a later dlopen of the same
//! soname by cudarc then finds the loaded copy. A missing piece becomes an `Error::Device` that
//! names it and says what to install.

use crate::error::{Error, Result};
use libloading::Library;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Extra folders from Python (`nvidia/cu13/lib` etc. in site-packages), set before first use.
static EXTRA_LIB_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static EXTRA_INCLUDE_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Tell the loader about pip-installed CUDA folders (called from Python at import).
pub fn add_search_dirs(lib_dirs: Vec<PathBuf>, include_dirs: Vec<PathBuf>) {
    if let Ok(mut l) = EXTRA_LIB_DIRS.lock() {
        l.extend(lib_dirs);
    }
    if let Ok(mut i) = EXTRA_INCLUDE_DIRS.lock() {
        i.extend(include_dirs);
    }
}

fn cuda_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> =
        ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"].iter().filter_map(std::env::var_os).filter(|v| !v.is_empty()).map(PathBuf::from).collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

/// Folders searched for a library, in order.
fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    for root in cuda_roots() {
        dirs.push(root.join("lib64"));
        dirs.push(root.join("lib"));
        dirs.push(root.join("targets/x86_64-linux/lib"));
    }
    dirs.extend(EXTRA_LIB_DIRS.lock().map(|d| d.clone()).unwrap_or_default());
    dirs.extend(["/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/wsl/lib"].map(PathBuf::from));
    dirs
}

/// Folders searched for `cuda_bf16.h`, in order.
fn include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec![];
    for root in cuda_roots() {
        dirs.push(root.join("include"));
        dirs.push(root.join("targets/x86_64-linux/include"));
    }
    dirs.extend(EXTRA_INCLUDE_DIRS.lock().map(|d| d.clone()).unwrap_or_default());
    dirs
}

/// Libraries we loaded, kept for the life of the process (unloading them under cudarc would crash).
static LOADED: Mutex<Vec<Library>> = Mutex::new(Vec::new());

/// Load the first of `names` found in the search folders (or, failing that, by the system's own
/// search), keeping it loaded. Returns the path or name that was loaded.
fn load_one(names: &[&str]) -> Option<String> {
    for dir in lib_dirs() {
        for name in names {
            let path = dir.join(name);
            if path.is_file() {
                // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions.
                if let Ok(lib) = unsafe { Library::new(&path) } {
                    LOADED.lock().ok()?.push(lib);
                    return Some(path.display().to_string());
                }
            }
        }
    }
    for name in names {
        // SAFETY: as above; the dynamic linker's own search (ld.so.cache, rpath).
        if let Ok(lib) = unsafe { Library::new(*name) } {
            LOADED.lock().ok()?.push(lib);
            return Some(name.to_string());
        }
    }
    None
}

/// What was found, or why CUDA can't be used here.
#[derive(Clone, Debug)]
pub struct Found {
    pub driver: String,
    pub nvrtc: String,
    pub cublas: String,
}

const INSTALL_HINT: &str =
    "install the CUDA 13 toolkit (and set CUDA_HOME), or `pip install nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cublas` (CUDA 13)";

fn find_nvrtc() -> Result<String> {
    let nvrtc = load_one(&["libnvrtc.so.13", "libnvrtc.so"])
        .ok_or_else(|| Error::Device(format!("NVRTC (libnvrtc.so.13) not found; {INSTALL_HINT}")))?;
    // NVRTC dlopens its builtins by soname at the first compile; load them from NVRTC's folder.
    if let Some(dir) = Path::new(&nvrtc).parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut names: Vec<String> =
                entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("libnvrtc-builtins.so.")).collect();
            names.sort();
            for n in names {
                // SAFETY: as in `load_one`.
                if let Ok(lib) = unsafe { Library::new(dir.join(n)) } {
                    if let Ok(mut l) = LOADED.lock() {
                        l.push(lib);
                    }
                }
            }
        }
    }
    Ok(nvrtc)
}

/// NCCL (tensor parallelism only), loaded once; the path it was found at.
pub fn find_nccl() -> Result<(String, &'static Library)> {
    static NCCL: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let path = NCCL
        .get_or_init(|| {
            load_one(&["libnccl.so.2", "libnccl.so"]).ok_or_else(|| {
                "NCCL (libnccl.so.2) not found: tensor_parallel on CUDA needs it; `pip install nvidia-nccl-cu13` or put it on LD_LIBRARY_PATH".to_string()
            })
        })
        .clone()
        .map_err(Error::Device)?;
    static LIB: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    // SAFETY: the library was just loaded successfully from this path; loading it again only adds a reference.
    let lib =
        LIB.get_or_init(|| unsafe { Library::new(&path) }.map_err(|e| e.to_string())).as_ref().map_err(|e| Error::Device(e.clone()))?;
    Ok((path, lib))
}

/// Only NVRTC (for compiling kernels on a machine without a GPU).
pub fn ensure_nvrtc() -> Result<String> {
    static NVRTC: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    NVRTC.get_or_init(|| find_nvrtc().map_err(|e| e.to_string())).clone().map_err(Error::Device)
}

/// Driver, NVRTC and cuBLAS, loaded once per process.
pub fn ensure_libs() -> Result<Found> {
    static FOUND: OnceLock<std::result::Result<Found, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let driver = load_one(&["libcuda.so.1", "libcuda.so"]).ok_or_else(|| {
                "the NVIDIA driver library libcuda.so.1 was not found: no NVIDIA driver is installed (or it is not on the library path)"
                    .to_string()
            })?;
            let nvrtc = ensure_nvrtc().map_err(|e| e.to_string())?;
            // libcublas needs libcublasLt: load it first so cublas's own dependency resolves to it.
            load_one(&["libcublasLt.so.13", "libcublasLt.so"])
                .ok_or_else(|| format!("cuBLASLt (libcublasLt.so.13) not found; {INSTALL_HINT}"))?;
            let cublas = load_one(&["libcublas.so.13", "libcublas.so"])
                .ok_or_else(|| format!("cuBLAS (libcublas.so.13) not found; {INSTALL_HINT}"))?;
            Ok(Found { driver, nvrtc, cublas })
        })
        .clone()
        .map_err(Error::Device)
}

/// The folder holding `cuda_bf16.h` (NVRTC needs it for the bf16 kernels).
pub fn find_include_dir() -> Result<PathBuf> {
    include_dirs().into_iter().find(|d| d.join("cuda_bf16.h").is_file()).ok_or_else(|| {
        Error::Device(format!(
            "the CUDA headers (cuda_bf16.h) were not found in CUDA_HOME/include, /usr/local/cuda/include or \
             site-packages/nvidia/cu13/include; {INSTALL_HINT}"
        ))
    })
}
