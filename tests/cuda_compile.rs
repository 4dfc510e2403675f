//! Every CUDA kernel compiles with NVRTC for sm_90 (the H200), for every dtype. Needs no GPU:
//! only NVRTC and the CUDA headers (e.g. `pip install nvidia-cuda-nvrtc==13.0.88
//! nvidia-cuda-runtime==13.0.96` and CUDA_HOME=<site-packages>/nvidia/cu13). Skipped, with a
//! message, where NVRTC or the headers are missing, and in builds without the `cuda` feature.
#![cfg(feature = "cuda")]

use qwen3rs::backend::cuda;
use qwen3rs::tensor::DType;

#[test]
fn every_kernel_compiles_for_sm90() {
    if let Err(e) = cuda::libs::ensure_nvrtc().and_then(|_| cuda::libs::find_include_dir()) {
        eprintln!("SKIP every_kernel_compiles_for_sm90: {e}");
        return;
    }
    let done = cuda::compile_kernels((9, 0)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.len(), 3 * cuda::compile::SOURCES.len(), "{done:?}");
    eprintln!("compiled {} kernel modules for sm_90: {done:?}", done.len());

    // expert_gemm's wgmma kernel is there for sm_90 (compiled as sm_90a) in bf16 and f16, and left
    // out in f32 and below sm_90 (the host never launches it there).
    let has_expert_gemm = |dtype, arch| {
        let bin = cuda::compile::cubin("expert_gemm", dtype, arch, 0, false).unwrap_or_else(|e| panic!("{e}"));
        bin.windows(b".text.expert_gemm".len()).any(|w| w == b".text.expert_gemm")
    };
    assert!(has_expert_gemm(DType::BF16, (9, 0)) && has_expert_gemm(DType::F16, (9, 0)));
    assert!(!has_expert_gemm(DType::F32, (9, 0)) && !has_expert_gemm(DType::BF16, (8, 9)));

    // QWEN3RS_CUDA_DEFINES reaches the compiler: another unroll gives another cubin, the default
    // value the same one. (One test: the variable is process-wide.)
    let matmul = || cuda::compile::cubin("matmul", DType::BF16, (9, 0), 0, false).unwrap_or_else(|e| panic!("{e}"));
    let plain = matmul();
    std::env::set_var("QWEN3RS_CUDA_DEFINES", "GV_UNROLL=8");
    assert!(matmul() == plain, "GV_UNROLL=8 is the default");
    std::env::set_var("QWEN3RS_CUDA_DEFINES", "GV_UNROLL=4");
    assert!(matmul() != plain, "GV_UNROLL=4 changed nothing");
    std::env::remove_var("QWEN3RS_CUDA_DEFINES");
}
