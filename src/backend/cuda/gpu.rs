//! The device layer under `CudaBackend`: one context, one stream and one cuBLAS handle per
//! backend; `DevMem`, an owned device allocation with a stable address (kernels take raw
//! pointers, so a later CUDA graph can capture them); kernel lookup and launch; error mapping
//! (CUDA_ERROR_OUT_OF_MEMORY → `Error::OutOfMemory`, everything else → `Error::Device`).
//! Every call first binds the context to the calling thread (Python may call from any thread).
//!
//! CUDA graphs: `Gpu::mode` says what a launch does. `Eager` launches; `Capture` launches while
//! the stream is being captured into a graph (so nothing runs yet); `Replay` launches nothing, only
//! hashes what would have been launched. Capture hashes the same way, so a replay whose kernels,
//! grids or arguments (device pointers included) differ from the captured ones is detected by
//! comparing two u64s, and the caller falls back to running eagerly. `PinnedMem` is page-locked
//! host memory: a copy from it can be captured, and reads its bytes at replay time.

use super::{compile, libs};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys, CudaContext, DriverError};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// What `Gpu::launch` and `Gpu::gemm` do (see the module comment).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Eager,
    Capture,
    Replay,
}

/// The launch mode and the running hash of what was launched since `set_mode`.
struct ModeState {
    mode: Mode,
    hash: u64,
}

/// FNV-1a step over `bytes`.
pub fn hash_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const HASH_START: u64 = 0xcbf2_9ce4_8422_2325;

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
    crate::ensure!(
        v >= 13000,
        Device,
        "the NVIDIA driver supports CUDA {}.{}, but qwen3rs is built for CUDA 13: update the driver to r580 or newer",
        v / 1000,
        (v % 1000) / 10
    );
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

/// Page-locked host memory (`cuMemHostAlloc`); freed on drop.
pub struct PinnedMem {
    ptr: *mut u8,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
}
// SAFETY: a plain host allocation; the owner serialises access (behind the backend's mutex).
unsafe impl Send for PinnedMem {}

impl PinnedMem {
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `bytes` bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for PinnedMem {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from cuMemHostAlloc in this context and is freed once. Callers drop
        // it only after the stream is synchronised (no copy still reads it).
        let _ = unsafe { sys::cuMemFreeHost(self.ptr as *mut c_void) };
    }
}

/// A CUDA event (no timing): marks a point of the stream the host can wait for; destroyed on drop.
pub struct Event {
    ev: sys::CUevent,
    ctx: Arc<CudaContext>,
}
// SAFETY: event handles may be used from any thread with the context bound.
unsafe impl Send for Event {}

impl Event {
    /// Block until the work queued before the last `Gpu::record` of this event has run.
    pub fn wait(&self) -> Result<()> {
        // SAFETY: `ev` is a live event of this context.
        unsafe { sys::cuEventSynchronize(self.ev) }.result().map_err(|e| drv_err("waiting for the GPU", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created by `Gpu::event`, destroyed once.
        let _ = unsafe { sys::cuEventDestroy_v2(self.ev) };
    }
}

/// An instantiated CUDA graph (and the graph it came from); destroyed on drop.
pub struct Graph {
    exec: sys::CUgraphExec,
    graph: sys::CUgraph,
    ctx: Arc<CudaContext>,
}
// SAFETY: graph handles may be used from any thread with the context bound.
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: both handles were created by `Gpu::end_capture` and are destroyed once; an exec
        // still running is finished by the driver before its resources go.
        unsafe {
            let _ = sys::cuGraphExecDestroy(self.exec);
            let _ = sys::cuGraphDestroy(self.graph);
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

/// A kernel and its static shared memory in bytes.
#[derive(Clone, Copy)]
struct Func(sys::CUfunction, u32);
// SAFETY: a CUfunction is an immutable handle valid in its context from any thread.
unsafe impl Send for Func {}

struct Module(sys::CUmodule);
// SAFETY: as `Func`.
unsafe impl Send for Module {}

/// (module, kernel, block size, dynamic shared memory): what a kernel's occupancy depends on.
type LaunchShape = (&'static str, &'static str, u32, u32);

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    h: Handles,
    pub dtype: DType,
    pub arch: (i32, i32),
    pub name: String,
    /// Multiprocessors (132 on the H200).
    pub sms: u32,
    driver: i32,
    /// Launch kernels with programmatic stream serialization (see `launch`) when they take at most
    /// this many bytes of dynamic shared memory (None: never).
    pdl_max_smem: Option<u32>,
    /// At most this many blocks per SM in a persistent grid (`QWEN3RS_CUDA_BLOCKS_PER_SM`'s bare N, for
    /// sweeps: fewer leave room for the next kernel's blocks to start early under PDL); None: the driver's
    /// occupancy. (Its FAMILY:N entries cap one GEMV family: mod.rs `parse_block_caps`.)
    blocks_per_sm: Option<u32>,
    /// Kernels never launched (`QWEN3RS_CUDA_SKIP`, mod.rs `parse_skip`; profiling only).
    skip: Vec<String>,
    modules: Mutex<HashMap<&'static str, Module>>,
    funcs: Mutex<HashMap<(&'static str, &'static str), Func>>,
    /// Resident blocks per SM of (module, kernel, block size, dynamic shared memory), from the driver.
    occupancy: Mutex<HashMap<LaunchShape, u32>>,
    /// The most threads a block of (module, kernel) takes: its launch bounds (`max_threads`).
    threads: Mutex<HashMap<(&'static str, &'static str), u32>>,
    mode: Mutex<ModeState>,
    /// Device arrays of matrix pointers for `grouped_gemm` (grow-only; each upload is ordered on
    /// the stream after the GEMMs that read the previous contents).
    ptr_arrays: Mutex<Option<DevMem>>,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // (Profiling: with several GPUs in one process, the last one dropped writes the file.)
        if let Ok(path) = std::env::var("QWEN3RS_CUDA_TIMELINE") {
            if let Err(e) =
                self.block_timeline().and_then(|csv| std::fs::write(&path, csv).map_err(|e| Error::io(std::path::Path::new(&path), e)))
            {
                eprintln!("qwen3rs: QWEN3RS_CUDA_TIMELINE: {e}");
            }
        }
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

/// Kernels with more dynamic shared memory than this launch without programmatic dependent launch:
/// the decode GEMVs that stage a long x. Qwen3-32B's down projection (51 KB) runs slower with it
/// (32B 53.1 tok/s with every kernel, 55.0 with a 16 KB limit, 56.7 with none; 0.6B 861, 920, 801:
/// RESULTS.md run 15; 0.980× with a 64 KB limit, run 25.1). 8B's (24 KB) runs faster with it since
/// the decode products issue their first weight loads before the wait (8B 1.022× with a 64 KB limit,
/// run 25.1), hence 32 KB. `QWEN3RS_CUDA_PDL_MAX_SMEM` overrides, `QWEN3RS_CUDA_PDL=0` turns it off.
const PDL_MAX_SMEM: u32 = 32 * 1024;

/// Let kernel `f` take `smem` bytes of dynamic shared memory (past 48 KB with its static shared memory
/// a kernel must opt in).
fn allow_smem(f: Func, name: &str, smem: u32) -> Result<()> {
    if smem + f.1 > 48 * 1024 {
        // SAFETY: `f` is a live function; raising its dynamic shared-memory limit is always valid.
        unsafe {
            drv::function::set_function_attribute(
                f.0,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
        }
        .map_err(|e| drv_err(&format!("{name}: shared memory"), e))?;
    }
    Ok(())
}

/// Clusters of more than 8 blocks (the portable limit; sm_90 takes 16) need the function's leave.
fn allow_cluster(f: Func, name: &str, cluster: u32) -> Result<()> {
    if cluster > 8 {
        // SAFETY: `f` is a live function; allowing non-portable cluster sizes is always valid.
        unsafe {
            drv::function::set_function_attribute(f.0, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)
        }
        .map_err(|e| drv_err(&format!("{name}: cluster size {cluster}"), e))?;
    }
    Ok(())
}

/// Kernel arguments for `Gpu::launch`: `args![a, b]` with each a local value of the exact type the
/// kernel takes (u64 for pointers, i32 for int, f32 for float); (pointer, size) so a launch can
/// also be hashed for graph replay.
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$( (&$a as *const _ as *mut ::std::ffi::c_void, ::std::mem::size_of_val(&$a)) ),*] };
}
pub(crate) use args;

impl Gpu {
    /// `blocks_per_sm`: the most blocks an SM of every persistent grid (None: as many as fit); `skip`: kernels
    /// never launched (profiling).
    pub fn new(ordinal: usize, dtype: DType, blocks_per_sm: Option<u32>, skip: Vec<String>) -> Result<Gpu> {
        let count = device_count()?;
        crate::ensure!(count > 0, Device, "no CUDA GPU found (the driver sees none)");
        crate::ensure!(ordinal < count, Device, "cuda:{ordinal} requested, but only {count} CUDA GPU(s) are visible");
        libs::find_include_dir()?; // say now, not at the first kernel, if the headers are missing
        let driver = driver_version()?;
        no_panic("CUDA setup", || {
            let ctx = CudaContext::new(ordinal).map_err(|e| drv_err(&format!("creating a context on cuda:{ordinal}"), e))?;
            let arch = ctx.compute_capability().map_err(|e| drv_err("reading the compute capability", e))?;
            let name = ctx.name().unwrap_or_else(|_| "CUDA GPU".into());
            let sms = ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| drv_err("reading the multiprocessor count", e))?
                .max(1) as u32;
            let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| drv_err("creating a stream", e))?;
            let blas = match blas::create_handle() {
                Ok(h) => h,
                Err(e) => {
                    // SAFETY: the stream was just created and is unused.
                    let _ = unsafe { drv::stream::destroy(stream) };
                    return Err(blas_err("creating a cuBLAS handle", e));
                }
            };
            let pdl_max_smem = (arch.0 >= 9 && !super::env_off("QWEN3RS_CUDA_PDL"))
                .then(|| std::env::var("QWEN3RS_CUDA_PDL_MAX_SMEM").ok().and_then(|v| v.parse().ok()).unwrap_or(PDL_MAX_SMEM));
            let gpu = Gpu {
                ctx,
                h: Handles { stream, blas },
                dtype,
                arch,
                name,
                sms,
                driver,
                pdl_max_smem,
                blocks_per_sm,
                skip,
                modules: Mutex::new(HashMap::new()),
                funcs: Mutex::new(HashMap::new()),
                occupancy: Mutex::new(HashMap::new()),
                threads: Mutex::new(HashMap::new()),
                mode: Mutex::new(ModeState { mode: Mode::Eager, hash: HASH_START }),
                ptr_arrays: Mutex::new(None),
            };
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
            unsafe { drv::malloc_sync(bytes) }
                .map_err(|e| drv_err(&format!("allocating {:.1} MiB on {}", bytes as f64 / (1 << 20) as f64, self.name), e))?
        };
        Ok(DevMem { ptr, bytes, ctx: self.ctx.clone() })
    }

    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DevMem> {
        let m = self.alloc(bytes)?;
        if bytes > 0 {
            self.memset_zero(m.ptr, bytes)?;
        }
        Ok(m)
    }

    /// Copy host bytes to `dst + offset` (ordered on the stream; pageable sources are staged
    /// before this returns, so `src` may be dropped right after).
    pub fn upload(&self, dst: &DevMem, offset: usize, src: &[u8]) -> Result<()> {
        crate::ensure!(
            offset + src.len() <= dst.bytes,
            InvalidArgument,
            "upload of {} bytes at {offset} overflows a {}-byte buffer",
            src.len(),
            dst.bytes
        );
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the destination range lies inside a live allocation (checked above).
        unsafe { drv::memcpy_htod_async(dst.ptr + offset as u64, src, self.h.stream) }.map_err(|e| drv_err("copying to the GPU", e))
    }

    /// Zero `bytes` bytes at `dst` (ordered on the stream).
    pub fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller passes a live device range of at least `bytes` bytes.
        unsafe { drv::memset_d8_async(dst, 0, bytes, self.h.stream) }.map_err(|e| drv_err("clearing GPU memory", e))
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

    /// The current mode; in Capture and Replay, fold one operation into the hash first.
    pub fn note(&self, record: impl FnOnce(u64) -> u64) -> Result<Mode> {
        let mut st = self.mode.lock().map_err(|_| Error::Device("launch mode poisoned".into()))?;
        if st.mode != Mode::Eager {
            st.hash = record(st.hash);
        }
        Ok(st.mode)
    }

    /// Switch the launch mode and restart the hash; returns the hash of the mode being left.
    pub fn set_mode(&self, mode: Mode) -> Result<u64> {
        let mut st = self.mode.lock().map_err(|_| Error::Device("launch mode poisoned".into()))?;
        st.mode = mode;
        Ok(std::mem::replace(&mut st.hash, HASH_START))
    }

    /// Page-locked host memory of `bytes` (zeroed).
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedMem> {
        self.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the context is bound; `p` is a valid out-pointer; the result is owned by PinnedMem.
        unsafe { sys::cuMemHostAlloc(&mut p, bytes.max(1), 0) }.result().map_err(|e| drv_err("allocating pinned host memory", e))?;
        let mut m = PinnedMem { ptr: p as *mut u8, bytes, ctx: self.ctx.clone() };
        m.as_mut_slice().fill(0);
        Ok(m)
    }

    /// Page-locked host memory of `bytes` (zeroed) that kernels can write: returns it and its device
    /// address (stores through it reach the host over the bus; read them after an event behind the kernel).
    pub fn alloc_mapped(&self, bytes: usize) -> Result<(PinnedMem, u64)> {
        self.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the context is bound; `p` is a valid out-pointer; the result is owned by PinnedMem.
        unsafe { sys::cuMemHostAlloc(&mut p, bytes.max(1), sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .result()
            .map_err(|e| drv_err("allocating mapped host memory", e))?;
        let mut m = PinnedMem { ptr: p as *mut u8, bytes, ctx: self.ctx.clone() };
        m.as_mut_slice().fill(0);
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `p` is live mapped host memory of this context; `dev` is a valid out-pointer.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0) }.result().map_err(|e| drv_err("mapping host memory", e))?;
        Ok((m, dev))
    }

    /// Queue a copy of `bytes` bytes from pinned `src` to device address `dst` (captured in a graph
    /// as a copy node that reads `src` when the graph runs).
    pub fn copy_from_pinned(&self, dst: u64, src: &PinnedMem, bytes: usize) -> Result<()> {
        crate::ensure!(bytes <= src.bytes, InvalidArgument, "copy of {bytes} bytes from a {}-byte pinned buffer", src.bytes);
        self.bind()?;
        // SAFETY: `src` is live page-locked memory of at least `bytes`; the caller passes a device
        // range of at least `bytes`; ordered on our stream.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.ptr as *const c_void, bytes, self.h.stream) }
            .result()
            .map_err(|e| drv_err("copying metadata to the GPU", e))
    }

    /// Start capturing everything queued on the stream into a graph (relaxed mode: allocation calls
    /// made meanwhile by this thread are allowed and not captured).
    pub fn begin_capture(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the stream is live and not already capturing.
        unsafe { sys::cuStreamBeginCapture_v2(self.h.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) }
            .result()
            .map_err(|e| drv_err("starting a CUDA graph capture", e))
    }

    /// End the capture begun by `begin_capture` and instantiate the graph. Always ends the capture,
    /// so the stream is usable again even when this errors.
    pub fn end_capture(&self) -> Result<Graph> {
        self.bind()?;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: the stream is capturing (begin_capture); `graph` is a valid out-pointer.
        unsafe { sys::cuStreamEndCapture(self.h.stream, &mut graph) }.result().map_err(|e| drv_err("ending a CUDA graph capture", e))?;
        crate::ensure!(!graph.is_null(), Device, "CUDA graph capture returned no graph");
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        // SAFETY: `graph` is the graph just captured; `exec` is a valid out-pointer.
        if let Err(e) = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result() {
            // SAFETY: `graph` is live and destroyed once here.
            unsafe { sys::cuGraphDestroy(graph) };
            return Err(drv_err("instantiating a CUDA graph", e));
        }
        Ok(Graph { exec, graph, ctx: self.ctx.clone() })
    }

    /// A new event (recorded nowhere yet: waiting on it returns at once).
    pub fn event(&self) -> Result<Event> {
        self.bind()?;
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: the context is bound; `ev` is a valid out-pointer, owned by the Event.
        unsafe { sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }
            .result()
            .map_err(|e| drv_err("creating a CUDA event", e))?;
        Ok(Event { ev, ctx: self.ctx.clone() })
    }

    /// Mark the current end of the stream with `ev`.
    pub fn record(&self, ev: &Event) -> Result<()> {
        self.bind()?;
        // SAFETY: `ev` is a live event of this context; the stream is live.
        unsafe { sys::cuEventRecord(ev.ev, self.h.stream) }.result().map_err(|e| drv_err("recording a CUDA event", e))
    }

    /// Queue one run of `graph` on the stream.
    pub fn launch_graph(&self, graph: &Graph) -> Result<()> {
        self.bind()?;
        // SAFETY: `graph.exec` is a live instantiated graph of this context.
        unsafe { sys::cuGraphLaunch(graph.exec, self.h.stream) }.result().map_err(|e| drv_err("launching a CUDA graph", e))
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
        // SAFETY: `f` is a live function; reading an attribute has no effect.
        let static_smem =
            unsafe { drv::function::get_function_attribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES) }
                .map_err(|e| drv_err(&format!("{name}: shared memory"), e))?;
        let func = Func(f, static_smem.max(0) as u32);
        self.funcs.lock().map_err(|_| Error::Device("kernel table poisoned".into()))?.insert((module, name), func);
        Ok(func)
    }

    /// What the kernels of a `BLOCK_TIMELINE` build recorded (common.cuh `Timeline`; profiling only):
    /// CSV lines `module,kernel,block,grid,smid,t0,wait,end,m0,..,m3` (%globaltimer ns; 0: not recorded),
    /// each module's ring oldest first. Modules built without the define add nothing.
    pub fn block_timeline(&self) -> Result<String> {
        const CAP: usize = 1 << 17;
        const RECORD: usize = 72;
        self.sync()?;
        let fnv = |s: &str| s.bytes().fold(2_166_136_261u32, |h, b| (h ^ b as u32).wrapping_mul(16_777_619));
        let names: HashMap<u32, &str> =
            self.funcs.lock().map_err(|_| Error::Device("kernel table poisoned".into()))?.keys().map(|(_, n)| (fnv(n), *n)).collect();
        let modules: Vec<(&str, sys::CUmodule)> =
            self.modules.lock().map_err(|_| Error::Device("module table poisoned".into()))?.iter().map(|(n, m)| (*n, m.0)).collect();
        let mut csv = String::from("module,kernel,block,grid,smid,t0,wait,end,m0,m1,m2,m3\n");
        for (module, m) in modules {
            let global = |name: &str| {
                let (mut ptr, mut bytes) = (0u64, 0usize);
                let cname = std::ffi::CString::new(name).expect("no NUL");
                // SAFETY: `m` is a loaded module of this context; a missing name is an error code.
                let r = unsafe { sys::cuModuleGetGlobal_v2(&mut ptr, &mut bytes, m, cname.as_ptr()) };
                (r == sys::CUresult::CUDA_SUCCESS).then_some((ptr, bytes))
            };
            let (Some((ring, ring_bytes)), Some((count, _))) = (global("qw_timeline"), global("qw_timeline_n")) else { continue };
            crate::ensure!(ring_bytes == CAP * RECORD, Device, "{module}: qw_timeline is {ring_bytes} bytes, not {}", CAP * RECORD);
            let mut n = [0u8; 4];
            self.download(&mut n, count)?;
            let n = u32::from_le_bytes(n) as usize;
            let mut raw = vec![0u8; CAP * RECORD];
            self.download(&mut raw, ring)?;
            let (first, len) = if n > CAP { (n % CAP, CAP) } else { (0, n) };
            for j in 0..len {
                let r = &raw[(first + j) % CAP * RECORD..][..RECORD];
                let u64_at = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().expect("8 bytes"));
                let u32_at = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().expect("4 bytes"));
                let kid = u32_at(56);
                let kernel = names.get(&kid).map_or_else(|| format!("{kid:#x}"), |n| n.to_string());
                csv += &format!("{module},{kernel},{},{},{},", u32_at(60), u32_at(64), u32_at(68));
                csv += &(0..7).map(|f| u64_at(8 * f).to_string()).collect::<Vec<_>>().join(",");
                csv.push('\n');
            }
        }
        Ok(csv)
    }

    /// Grid of a persistent kernel (one that loops over its work): as many blocks of `block` threads
    /// with `smem` bytes of dynamic shared memory as are resident on the GPU at once (the driver's
    /// occupancy calculator × SMs), but no more than `useful`.
    pub fn persistent_grid(&self, module: &'static str, name: &'static str, block: u32, smem: u32, useful: usize) -> Result<u32> {
        let key = (module, name, block, smem); // a kernel of two builds (matmul, matmul_wide, ...): two entries
        let cached = self.occupancy.lock().map_err(|_| Error::Device("occupancy table poisoned".into()))?.get(&key).copied();
        let per_sm = match cached {
            Some(v) => v,
            None => {
                self.bind()?;
                let f = self.function(module, name)?;
                allow_smem(f, name, smem)?;
                // SAFETY: `f` is a live function of this context.
                let v = unsafe { drv::occupancy::max_active_block_per_multiprocessor(f.0, block as i32, smem as usize) }
                    .map_err(|e| drv_err(&format!("{name}: occupancy"), e))?
                    .max(1) as u32;
                self.occupancy.lock().map_err(|_| Error::Device("occupancy table poisoned".into()))?.insert(key, v);
                v
            }
        };
        let per_sm = self.blocks_per_sm.map_or(per_sm, |cap| per_sm.min(cap));
        Ok((per_sm * self.sms).min(useful.max(1) as u32))
    }

    /// The most threads a block of `module::name` may have: its `__launch_bounds__`, where it sets one
    /// (a kernel whose block size is a tunable constant: the host asks it here).
    pub fn max_threads(&self, module: &'static str, name: &'static str) -> Result<u32> {
        let poisoned = || Error::Device("launch-bounds table poisoned".into());
        if let Some(&n) = self.threads.lock().map_err(|_| poisoned())?.get(&(module, name)) {
            return Ok(n);
        }
        self.bind()?;
        let f = self.function(module, name)?;
        // SAFETY: `f` is a live function of this context.
        let n = unsafe { drv::function::get_function_attribute(f.0, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK) }
            .map_err(|e| drv_err(&format!("{name}: threads a block"), e))?
            .max(1) as u32;
        self.threads.lock().map_err(|_| poisoned())?.insert((module, name), n);
        Ok(n)
    }

    /// Launch `module::name` on the stream. `args` must match the kernel's parameters exactly.
    pub fn launch(
        &self,
        module: &'static str,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[(*mut c_void, usize)],
    ) -> Result<()> {
        self.launch_cluster(module, name, grid, block, smem, 1, args)
    }

    /// `launch` with the grid's blocks in clusters of `cluster` consecutive z indices (sm_90+, at most
    /// 16; grid.2 a multiple of it): a cluster's blocks run at once and share their shared memory.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_cluster(
        &self,
        module: &'static str,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        cluster: u32,
        args: &[(*mut c_void, usize)],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || self.skip.iter().any(|s| s == name) {
            return Ok(());
        }
        crate::ensure!(
            cluster >= 1 && grid.2.is_multiple_of(cluster) && (cluster == 1 || self.arch.0 >= 9),
            InvalidArgument,
            "{name}: clusters of {cluster} blocks for a grid of {} (sm_{}{})",
            grid.2,
            self.arch.0,
            self.arch.1
        );
        let record = |h: u64| -> u64 {
            let mut h = hash_bytes(h, module.as_bytes());
            h = hash_bytes(h, name.as_bytes());
            for v in [grid.0, grid.1, grid.2, block, smem, cluster] {
                h = hash_bytes(h, &v.to_le_bytes());
            }
            for &(p, n) in args {
                // SAFETY: `args!` pairs each pointer with the size of the value it points at.
                h = hash_bytes(h, unsafe { std::slice::from_raw_parts(p as *const u8, n) });
            }
            h
        };
        if self.note(record)? == Mode::Replay {
            // Resolve the kernel now (a no-op after its first use), so that a capture following
            // this dry pass never loads a module.
            self.bind()?;
            self.function(module, name)?;
            return Ok(());
        }
        let mut ptrs = [std::ptr::null_mut::<c_void>(); 24];
        crate::ensure!(args.len() <= ptrs.len(), InvalidArgument, "{name}: too many kernel arguments");
        for (d, &(p, _)) in ptrs.iter_mut().zip(args) {
            *d = p;
        }
        let args = &mut ptrs[..args.len()];
        self.bind()?;
        let f = self.function(module, name)?;
        allow_smem(f, name, smem)?;
        allow_cluster(f, name, cluster)?;
        let pdl = self.pdl_max_smem.is_some_and(|m| smem <= m);
        if !pdl && cluster == 1 {
            // SAFETY: `args` points at values laid out as the kernel's parameters (see `args!`), and
            // every device pointer among them is a live allocation sized for this launch.
            return unsafe { drv::launch_kernel(f.0, grid, (block, 1, 1), smem, self.h.stream, args) }
                .map_err(|e| drv_err(&format!("launching {name}"), e));
        }
        // SAFETY: an all-zero CUlaunchAttribute is valid plain data; ids and values are set below.
        let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut n = 0;
        if pdl {
            // Programmatic dependent launch (sm_90+, up to PDL_MAX_SMEM): the kernel may start while the
            // one before it on the stream is still finishing. Every kernel of kernels/ begins with `grid_dependency()`
            // (common.cuh), which waits for its predecessor to complete before touching activations,
            // so only prologues that read weights (L2 prefetches, first weight loads) overlap the predecessor's tail, and
            // the launch latency overlaps it too. Captured into CUDA graphs as programmatic edges.
            attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n].value.programmaticStreamSerializationAllowed = 1;
            n += 1;
        }
        if cluster > 1 {
            attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attrs[n].value.clusterDim.x = 1;
            attrs[n].value.clusterDim.y = 1;
            attrs[n].value.clusterDim.z = cluster;
            n += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.h.stream,
            attrs: attrs.as_mut_ptr(),
            numAttrs: n as u32,
        };
        // SAFETY: as above; `config` and `attrs` outlive the call.
        unsafe { sys::cuLaunchKernelEx(&config, f.0, args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| drv_err(&format!("launching {name}"), e))
    }

    /// Several products of one shape family in one cuBLAS call (cublasGemmGroupedBatchedEx): per
    /// group (out, x, w, rows), out [rows, N] = x [rows, K] · w [N, K]ᵀ. Eager mode only (it uploads
    /// the pointer arrays from pageable memory).
    pub fn grouped_gemm(&self, groups: &[(u64, u64, u64, usize)], n: usize, k: usize) -> Result<()> {
        let g = groups.len();
        if g == 0 {
            return Ok(());
        }
        crate::ensure!(self.note(|h| h)? == Mode::Eager, Device, "grouped GEMM inside a CUDA graph step");
        self.bind()?;
        let ty = self.blas_type();
        // Device pointer arrays: A = weights, B = inputs, C = outputs (column-major view as `gemm`).
        let mut ptrs: Vec<u64> = Vec::with_capacity(3 * g);
        ptrs.extend(groups.iter().map(|x| x.2));
        ptrs.extend(groups.iter().map(|x| x.1));
        ptrs.extend(groups.iter().map(|x| x.0));
        let mut arrays = self.ptr_arrays.lock().map_err(|_| Error::Device("pointer arrays poisoned".into()))?;
        if arrays.as_ref().is_none_or(|m| m.bytes < ptrs.len() * 8) {
            *arrays = None;
            *arrays = Some(self.alloc((ptrs.len() * 8).next_power_of_two().max(4096))?);
        }
        let dev = arrays.as_ref().expect("allocated above");
        self.upload(dev, 0, bytemuck::cast_slice(&ptrs))?;
        let (a, b, c) = (dev.ptr, dev.ptr + 8 * g as u64, dev.ptr + 16 * g as u64);
        let ta = vec![blas_sys::cublasOperation_t::CUBLAS_OP_T; g];
        let tb = vec![blas_sys::cublasOperation_t::CUBLAS_OP_N; g];
        let (ms, ks) = (vec![n as i32; g], vec![k as i32; g]);
        let ns: Vec<i32> = groups.iter().map(|x| x.3 as i32).collect();
        let (alpha, beta, sizes) = (vec![1f32; g], vec![0f32; g], vec![1i32; g]);
        // SAFETY: the pointer arrays hold g live device matrices each of the stated shapes (the
        // caller's contract); the host arrays have g entries; alpha/beta are host f32 (the handle's
        // default pointer mode) matching the f32 compute type.
        let status = unsafe {
            blas_sys::cublasGemmGroupedBatchedEx(
                self.h.blas,
                ta.as_ptr(),
                tb.as_ptr(),
                ms.as_ptr(),
                ns.as_ptr(),
                ks.as_ptr(),
                alpha.as_ptr() as *const c_void,
                a as *const *const c_void,
                ty,
                ks.as_ptr(),
                b as *const *const c_void,
                ty,
                ks.as_ptr(),
                beta.as_ptr() as *const c_void,
                c as *const *mut c_void,
                ty,
                ms.as_ptr(),
                g as i32,
                sizes.as_ptr(),
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        };
        status.result().map_err(|e| blas_err("cuBLAS grouped GEMM", e))
    }

    /// cuBLAS's name for the compute dtype.
    fn blas_type(&self) -> blas_sys::cudaDataType {
        match self.dtype {
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        }
    }

    /// out [T, N] = x [T, K] · w [N, K]ᵀ through cuBLAS, f32 accumulation, output in the compute dtype.
    pub fn gemm(&self, out: u64, x: u64, w: u64, t: usize, n: usize, k: usize) -> Result<()> {
        self.gemm_to(out, false, x, w, t, n, k)
    }

    /// `gemm` with an f32 output (out_f32) or one in the compute dtype.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_to(&self, out: u64, out_f32: bool, x: u64, w: u64, t: usize, n: usize, k: usize) -> Result<()> {
        let record = |mut h: u64| {
            for v in [out, out_f32 as u64, x, w, t as u64, n as u64, k as u64] {
                h = hash_bytes(h, &v.to_le_bytes());
            }
            h
        };
        if self.note(record)? == Mode::Replay {
            return Ok(());
        }
        self.bind()?;
        let ty = self.blas_type();
        let (alpha, beta) = (1f32, 0f32);
        // Column-major view: outᵀ [N, T] = W [K, N]ᵀ · xᵀ [K, T].
        // SAFETY: the pointers are live device buffers of the stated shapes; alpha/beta are host f32
        // (the handle's default pointer mode) matching the f32 compute type.
        unsafe {
            blas::gemm_ex(
                self.h.blas,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                ty,
                k as i32,
                x as *const c_void,
                ty,
                k as i32,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                if out_f32 { blas_sys::cudaDataType::CUDA_R_32F } else { ty },
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err("cuBLAS GEMM", e))
    }
}
