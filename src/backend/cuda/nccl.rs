//! NCCL for tensor parallelism over the GPUs of one host: one communicator per rank made with
//! ncclCommInitAll in this process, and an in-place sum all-reduce of each rank's buffer on that
//! rank's stream, all ranks inside one NCCL group. Six NCCL functions are called through our own
//! symbol lookup: cudarc's NCCL loader looks for names pip's `libnccl.so.2` doesn't have.
//! NVLink multicast (NVLS) stays off unless the user set it: the lending machines require it.

use super::libs;
use super::{CudaBackend, CudaBuf};
use crate::backend::tp::Collective;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::ffi::{c_char, c_int, c_void, CStr};

type Comm = *mut c_void;
type InitAll = unsafe extern "C" fn(*mut Comm, c_int, *const c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;
type Group = unsafe extern "C" fn() -> c_int;
type Destroy = unsafe extern "C" fn(Comm) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

const NCCL_SUM: c_int = 0;
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_BFLOAT16: c_int = 9;

/// Environment NCCL reads at init: NVLink SHARP / multicast off (KINDS.md of the lending machines).
const NVLS_OFF: [(&str, &str); 2] = [("NCCL_NVLS_ENABLE", "0"), ("NCCL_NVLSTREE_ENABLE", "0")];

struct Api {
    init_all: InitAll,
    all_reduce: AllReduce,
    group_start: Group,
    group_end: Group,
    destroy: Destroy,
    error_string: ErrorString,
}

fn api() -> Result<Api> {
    let (path, lib) = libs::find_nccl()?;
    // SAFETY: the symbols are NCCL's public C API with exactly these signatures (nccl.h, 2.x).
    unsafe {
        let sym = |name: &[u8]| -> Result<*const c_void> {
            lib.get::<*const c_void>(name).map(|s| *s).map_err(|e| Error::Device(format!("{path}: {e}")))
        };
        Ok(Api {
            init_all: std::mem::transmute::<*const c_void, InitAll>(sym(b"ncclCommInitAll\0")?),
            all_reduce: std::mem::transmute::<*const c_void, AllReduce>(sym(b"ncclAllReduce\0")?),
            group_start: std::mem::transmute::<*const c_void, Group>(sym(b"ncclGroupStart\0")?),
            group_end: std::mem::transmute::<*const c_void, Group>(sym(b"ncclGroupEnd\0")?),
            destroy: std::mem::transmute::<*const c_void, Destroy>(sym(b"ncclCommDestroy\0")?),
            error_string: std::mem::transmute::<*const c_void, ErrorString>(sym(b"ncclGetErrorString\0")?),
        })
    }
}

/// The communicators of one tensor-parallel group, rank order.
pub struct NcclGroup {
    api: Api,
    comms: Vec<Comm>,
}

// SAFETY: NCCL communicators may be used from any thread; the engine serialises all calls on a
// group (one generate at a time per model, behind its mutex).
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    fn check(&self, what: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let msg = unsafe { CStr::from_ptr((self.api.error_string)(code)) }.to_string_lossy().into_owned();
        Err(Error::Device(format!("NCCL {what} failed: {msg} (code {code})")))
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        for &c in &self.comms {
            // SAFETY: each communicator was created by ncclCommInitAll and is destroyed once.
            unsafe { (self.api.destroy)(c) };
        }
    }
}

impl Collective for CudaBackend {
    type Group = NcclGroup;

    fn group(ranks: &[Self]) -> Result<NcclGroup> {
        for (k, v) in NVLS_OFF {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
        let api = api()?;
        let devices: Vec<c_int> = ranks.iter().map(|b| b.ordinal() as c_int).collect();
        let mut comms = vec![std::ptr::null_mut(); ranks.len()];
        // SAFETY: `comms` has room for one communicator per device listed in `devices`.
        let code = unsafe { (api.init_all)(comms.as_mut_ptr(), devices.len() as c_int, devices.as_ptr()) };
        let group = NcclGroup { api, comms };
        group.check("ncclCommInitAll", code)?;
        Ok(group)
    }

    fn all_reduce_sum(group: &NcclGroup, ranks: &[Self], bufs: &mut [CudaBuf]) -> Result<()> {
        let dtype = match ranks[0].dtype() {
            DType::F32 => NCCL_FLOAT32,
            DType::BF16 => NCCL_BFLOAT16,
            DType::F16 => NCCL_FLOAT16,
        };
        // SAFETY: group calls bracket the per-rank all-reduces, as NCCL requires for one thread
        // driving several devices.
        group.check("ncclGroupStart", unsafe { (group.api.group_start)() })?;
        let mut first_err = Ok(());
        for ((b, buf), &comm) in ranks.iter().zip(bufs.iter_mut()).zip(&group.comms) {
            let result = b.bind().and_then(|_| {
                let ptr = buf.device_ptr() as *mut c_void;
                // SAFETY: `ptr` holds `rows * cols` elements of the compute dtype on this rank's device;
                // in-place all-reduce is allowed (send == recv); the stream belongs to this rank.
                let code = unsafe { (group.api.all_reduce)(ptr, ptr, buf.rows * buf.cols, dtype, NCCL_SUM, comm, b.stream_handle()) };
                group.check("ncclAllReduce", code)
            });
            if first_err.is_ok() {
                first_err = result;
            }
        }
        // SAFETY: closes the group opened above (always, so NCCL's group state stays balanced).
        let end = group.check("ncclGroupEnd", unsafe { (group.api.group_end)() });
        first_err.and(end)
    }
}
