//! The device layer under `CudaBackend`: one context, one stream and one cuBLAS handle per
//! backend; `DevMem`, an owned device allocation with a stable address (kernels take raw
//! pointers, so a later CUDA graph can capture them); kernel lookup and launch; error mapping
//! (CUDA_ERROR_OUT_OF_MEMORY → `Error::OutOfMemory`, everything else → `Error::Device`).
//! Every call first binds the context to the calling thread (Python may call from any thread).

use super::{compile, libs};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys, CudaContext, DriverError};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

pub fn drv_err(what: &str, e: DriverError) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{what}: the GPU is out of memory"))
    } else {
        Error::Device(format!("{what}: {e}"))
    }
}

fn blas_err(what: &str, e: blas::CublasError) -> Error {
    if e.0 == blas_sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
        Error::OutOfMemory(format!("{what}: cuBLAS could not allocate GPU memory"))
    } else {
        Error::Device(format!("{what}: {e}"))
    }
}

/// Run `f`, turning a panic inside cudarc (a missing symbol in an old driver) into an error.
pub fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        Err(Error::Device(format!("{what}: CUDA library call failed: {msg}")))
    })
}

/// The CUDA driver's version as 1000*major + 10*minor, after loading the libraries.
pub fn driver_version() -> Result<i32> {
    libs::ensure_libs()?;
    no_panic("CUDA driver", || {
        drv::init().map_err(|e| drv_err("initialising the CUDA driver", e))?;
        let mut v = 0;
        // SAFETY: the driver is loaded and initialised; `v` is a valid out-pointer.
        unsafe { sys::cuDriverGetVersion(&mut v) }.result().map_err(|e| drv_err("cuDriverGetVersion", e))?;
        Ok(v)
    })
}

/// How many CUDA devices the driver sees (errors when the libraries or driver are unusable).
pub fn device_count() -> Result<usize> {
    let v = driver_version()?;
    crate::ensure!(v >= 13000, Device,
        "the NVIDIA driver supports CUDA {}.{}, but qwen3rs is built for CUDA 13: update the driver to r580 or newer",
        v / 1000, (v % 1000) / 10);
    no_panic("CUDA driver", || Ok(drv::device::get_count().map_err(|e| drv_err("counting CUDA devices", e))? as usize))
}

/// An owned device allocation; freed on drop. `ptr` is 0 for an empty one.
pub struct DevMem {
    pub ptr: u64,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed once; cuMemFree
            // waits for work still using it.
            let _ = unsafe { drv::free_sync(self.ptr) };
        }
    }
}

/// The raw handles, shareable across threads: every use binds the context first and goes
/// through the one stream, and the backend's ops are serialised by the engine.
struct Handles {
    stream: sys::CUstream,
    blas: blas_sys::cublasHandle_t,
}
// SAFETY: CUDA stream and cuBLAS handles may be used from any thread with the context bound.
unsafe impl Send for Handles {}
unsafe impl Sync for Handles {}

#[derive(Clone, Copy)]
struct Func(sys::CUfunction);
// SAFETY: a CUfunction is an immutable handle valid in its context from any thread.
unsafe impl Send for Func {}

struct Module(sys::CUmodule);
// SAFETY: as `Func`.
unsafe impl Send for Module {}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    h: Handles,
    pub dtype: DType,
    pub arch: (i32, i32),
    pub name: String,
    driver: i32,
    modules: Mutex<HashMap<&'static str, Module>>,
    funcs: Mutex<HashMap<(&'static str, &'static str), Func>>,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the handles were created by `Gpu::new` and are destroyed once, after the
        // stream's work is done; modules are unloaded after that.
        unsafe {
            let _ = drv::stream::synchronize(self.h.stream);
            let _ = blas::destroy_handle(self.h.blas);
            let _ = drv::stream::destroy(self.h.stream);
            if let Ok(mods) = self.modules.get_mut() {
                for (_, m) in mods.drain() {
                    let _ = drv::module::unload(m.0);
                }
            }
        }
    }
}

/// Pointers to kernel arguments, for `Gpu::launch`: `args![a, b]` with each a local value of the
/// exact type the kernel takes (u64 for pointers, i32 for int, f32 for float).
macro_rules! args {
    ($($a:expr),* $(,)?) => { &mut [$( &$a as *const _ as *mut ::std::ffi::c_void ),*] };
}
pub(crate) use args;

impl Gpu {
    pub fn new(ordinal: usize, dtype: DType) -> Result<Gpu> {
        let count = device_count()?;
        crate::ensure!(count > 0, Device, "no CUDA GPU found (the driver sees none)");
        crate::ensure!(ordinal < count, Device, "cuda:{ordinal} requested, but only {count} CUDA GPU(s) are visible");
        libs::find_include_dir()?; // say now, not at the first kernel, if the headers are missing
        let driver = driver_version()?;
        no_panic("CUDA setup", || {
            let ctx = CudaContext::new(ordinal).map_err(|e| drv_err(&format!("creating a context on cuda:{ordinal}"), e))?;
            let arch = ctx.compute_capability().map_err(|e| drv_err("reading the compute capability", e))?;
            let name = ctx.name().unwrap_or_else(|_| "CUDA GPU".into());
            let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| drv_err("creating a stream", e))?;
            let blas = match blas::create_handle() {
                Ok(h) => h,
                Err(e) => {
                    // SAFETY: the stream was just created and is unused.
                    let _ = unsafe { drv::stream::destroy(stream) };
                    return Err(blas_err("creating a cuBLAS handle", e));
                }
            };
            let gpu = Gpu { ctx, h: Handles { stream, blas }, dtype, arch, name, driver,
                modules: Mutex::new(HashMap::new()), funcs: Mutex::new(HashMap::new()) };
            // SAFETY: both handles are live; cuBLAS then orders its work on our stream.
            unsafe { blas::set_stream(gpu.h.blas, gpu.h.stream as _) }.map_err(|e| blas_err("cublasSetStream", e))?;
            Ok(gpu)
        })
    }

    /// The stream every launch, copy and cuBLAS call of this GPU is ordered on.
    pub fn stream(&self) -> sys::CUstream {
        self.h.stream
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| drv_err("binding the CUDA context", e))
    }

    /// A device allocation of `bytes` (contents undefined).
    pub fn alloc(&self, bytes: usize) -> Result<DevMem> {
        self.bind()?;
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: the context is bound; the allocation is owned by the returned DevMem.
            unsafe { drv::malloc_sync(bytes) }.map_err(|e| drv_err(&format!("allocating {:.1} MiB on {}", bytes as f64 / (1 << 20) as f64, self.name), e))?
        };
        Ok(DevMem { ptr, bytes, ctx: self.ctx.clone() })
    }

    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DevMem> {
        let m = self.alloc(bytes)?;
        if bytes > 0 {
            // SAFETY: `m` is a live allocation of `bytes` bytes; ordered on our stream.
            unsafe { drv::memset_d8_async(m.ptr, 0, bytes, self.h.stream) }.map_err(|e| drv_err("memset", e))?;
        }
        Ok(m)
    }

    /// Copy host bytes to `dst + offset` (ordered on the stream; pageable sources are staged
    /// before this returns, so `src` may be dropped right after).
    pub fn upload(&self, dst: &DevMem, offset: usize, src: &[u8]) -> Result<()> {
        crate::ensure!(offset + src.len() <= dst.bytes, InvalidArgument, "upload of {} bytes at {offset} overflows a {}-byte buffer", src.len(), dst.bytes);
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the destination range lies inside a live allocation (checked above).
        unsafe { drv::memcpy_htod_async(dst.ptr + offset as u64, src, self.h.stream) }.map_err(|e| drv_err("copying to the GPU", e))
    }

    /// Copy `dst.len()` bytes from `src` to the host, waiting for all queued work first.
    pub fn download(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        if !dst.is_empty() {
            // SAFETY: the caller passes a live device range of at least dst.len() bytes.
            unsafe { drv::memcpy_dtoh_async(dst, src, self.h.stream) }.map_err(|e| drv_err("copying from the GPU", e))?;
        }
        self.sync()
    }

    pub fn sync(&self) -> Result<()> {
        // SAFETY: the stream is live.
        unsafe { drv::stream::synchronize(self.h.stream) }.map_err(|e| drv_err("running GPU kernels", e))
    }

    fn function(&self, module: &'static str, name: &'static str) -> Result<Func> {
        if let Some(f) = self.funcs.lock().map_err(|_| Error::Device("kernel table poisoned".into()))?.get(&(module, name)) {
            return Ok(*f);
        }
        let mut modules = self.modules.lock().map_err(|_| Error::Device("module table poisoned".into()))?;
        if !modules.contains_key(module) {
            let cubin = compile::cubin(module, self.dtype, self.arch, self.driver, true)?;
            // SAFETY: `cubin` is a complete cubin image from NVRTC (or our cache); the context is bound.
            let m = unsafe { drv::module::load_data(cubin.as_ptr() as *const c_void) }
                .map_err(|e| drv_err(&format!("loading kernel module {module} (delete ~/.cache/qwen3rs if it is stale)"), e))?;
            modules.insert(module, Module(m));
        }
        let m = modules[module].0;
        let cname = std::ffi::CString::new(name).expect("kernel names have no NUL");
        // SAFETY: `m` is a loaded module of this context.
        let f = unsafe { drv::module::get_function(m, cname) }.map_err(|e| drv_err(&format!("finding kernel {name}"), e))?;
        self.funcs.lock().map_err(|_| Error::Device("kernel table poisoned".into()))?.insert((module, name), Func(f));
        Ok(Func(f))
    }

    /// Launch `module::name` on the stream. `args` must match the kernel's parameters exactly.
    pub fn launch(&self, module: &'static str, name: &'static str, grid: (u32, u32, u32), block: u32, smem: u32,
        args: &mut [*mut c_void]) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        self.bind()?;
        let f = self.function(module, name)?;
        if smem > 48 * 1024 {
            // SAFETY: `f` is a live function; raising its dynamic shared-memory limit is always valid.
            unsafe {
                drv::function::set_function_attribute(f.0, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            }.map_err(|e| drv_err(&format!("{name}: shared memory"), e))?;
        }
        // SAFETY: `args` points at values laid out as the kernel's parameters (see `args!`), and
        // every device pointer among them is a live allocation sized for this launch.
        unsafe { drv::launch_kernel(f.0, grid, (block, 1, 1), smem, self.h.stream, args) }
            .map_err(|e| drv_err(&format!("launching {name}"), e))
    }

    /// out [T, N] = x [T, K] · w [N, K]ᵀ through cuBLAS, f32 accumulation, output in the compute dtype.
    pub fn gemm(&self, out: u64, x: u64, w: u64, t: usize, n: usize, k: usize) -> Result<()> {
        self.bind()?;
        let ty = match self.dtype {
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        };
        let (alpha, beta) = (1f32, 0f32);
        // Column-major view: outᵀ [N, T] = W [K, N]ᵀ · xᵀ [K, T].
        // SAFETY: the pointers are live device buffers of the stated shapes; alpha/beta are host f32
        // (the handle's default pointer mode) matching the f32 compute type.
        unsafe {
            blas::gemm_ex(self.h.blas, blas_sys::cublasOperation_t::CUBLAS_OP_T, blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32, t as i32, k as i32, &alpha as *const f32 as *const c_void, w as *const c_void, ty, k as i32,
                x as *const c_void, ty, k as i32, &beta as *const f32 as *const c_void, out as *mut c_void, ty, n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT)
        }
        .map_err(|e| blas_err("cuBLAS GEMM", e))
    }
}
