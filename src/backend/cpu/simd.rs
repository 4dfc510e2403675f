//! Runtime-dispatched SIMD kernels for the CPU backend: the instruction set is detected once
//! (`best()`), so one wheel runs the fastest path each CPU has. Every kernel takes the `Isa` to use,
//! which lets the tests run each path against the scalar reference in `kernels.rs`.
//!
//! - Dot-product tiles (`tile`): M weight rows × N activation rows, weights f32 / bf16 / int8,
//!   activations f32; with AVX512-BF16 also bf16 × bf16 (`vdpbf16ps`) for activations that are already
//!   bf16-exact (bf16 compute). Explicit intrinsics: reductions need reassociation the compiler won't do.
//! - Elementwise maps (bf16 rounding, SwiGLU, RMSNorm, softmax, axpy): written once as plain Rust
//!   and compiled per instruction set with `#[target_feature]` (`multiversion!`), so the vector code
//!   computes the same value per element as the scalar code.

use half::bf16;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// An instruction-set level, ordered from the reference up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Neon,
    Avx2,
    Avx512,
    Avx512Bf16,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Every level this CPU can run (the scalar reference first).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
                v.push(Isa::Avx512);
                if is_x86_feature_detected!("avx512bf16") {
                    v.push(Isa::Avx512Bf16);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Isa::Neon);
            }
        }
        v
    }
}

/// The best level this CPU runs, detected once. `QWEN3RS_CPU_ISA=scalar|avx2|avx512|...` caps it
/// (for measuring each path); a level the CPU lacks is never chosen.
pub fn best() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(|| {
        let avail = Isa::available();
        let top = *avail.last().expect("scalar is always available");
        match std::env::var("QWEN3RS_CPU_ISA") {
            Ok(want) => avail.iter().copied().find(|i| i.name() == want.trim()).unwrap_or(top),
            Err(_) => top,
        }
    })
}

/// A weight element the dot tiles read.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    /// The nearest bf16's bits (exact for bf16 and int8).
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        (round_bf16_one(self.widen()).to_bits() >> 16) as u16
    }
}
impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }
}
impl WeightElem for i8 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        // |q| ≤ 128 has at most 8 significant bits: the f32's top half is exact.
        ((self as f32).to_bits() >> 16) as u16
    }
}

/// The scalar reference tile: each output is the reference `dot` (int8 sums are raw, unscaled).
fn tile_scalar<W: WeightElem, const M: usize, const N: usize>(w: [&[W]; M], x: [&[f32]; N]) -> [[f32; N]; M] {
    let mut out = [[0f32; N]; M];
    for m in 0..M {
        for n in 0..N {
            out[m][n] = dot_ref(w[m], x[n]);
        }
    }
    out
}

/// Σ w[i]·x[i] with eight lanes, as `kernels::dot` (the reference for int8 too).
pub fn dot_ref<W: WeightElem>(w: &[W], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += w[c * 8 + l].widen() * x[c * 8 + l];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in chunks * 8..w.len() {
        sum += w[i].widen() * x[i];
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// x86-64 tiles. One macro body per width; the weight load (widen to f32 lanes) is the only part
// that differs between element types.

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_bf16(p: *const bf16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_i8(p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load8_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load8_bf16(p: *const bf16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
    }
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load8_i8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    macro_rules! tile512 {
        ($name:ident, $t:ty, $load:ident) => {
            /// # Safety
            /// The CPU has AVX-512 F/BW/VL; all rows are at least `x[0].len()` long (the prefetch hint may
            /// point past them: it is computed with wrapping_add and never dereferenced).
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            pub unsafe fn $name<const M: usize, const N: usize>(w: [&[$t]; M], x: [&[f32]; N]) -> [[f32; N]; M] {
                let k = x[0].len();
                let mut acc = [[_mm512_setzero_ps(); N]; M];
                let mut i = 0;
                while i + 16 <= k {
                    let mut xv = [_mm512_setzero_ps(); N];
                    for n in 0..N {
                        xv[n] = _mm512_loadu_ps(x[n].as_ptr().add(i));
                    }
                    for m in 0..M {
                        if N == 1 {
                            // Decode streams each weight row once and a row is only 1–2 KiB, too
                            // short for the hardware prefetcher to ramp up: fetch the row M ahead.
                            _mm_prefetch::<_MM_HINT_T0>(w[m].as_ptr().wrapping_add(i + M * k) as *const i8);
                        }
                        let wv = $load(w[m].as_ptr().add(i));
                        for n in 0..N {
                            acc[m][n] = _mm512_fmadd_ps(wv, xv[n], acc[m][n]);
                        }
                    }
                    i += 16;
                }
                let mut out = [[0f32; N]; M];
                for m in 0..M {
                    for n in 0..N {
                        let mut s = _mm512_reduce_add_ps(acc[m][n]);
                        for j in i..k {
                            s += w[m].get_unchecked(j).widen() * x[n].get_unchecked(j);
                        }
                        out[m][n] = s;
                    }
                }
                out
            }
        };
    }
    tile512!(tile512_f32, f32, load16_f32);
    tile512!(tile512_bf16, bf16, load16_bf16);
    tile512!(tile512_i8, i8, load16_i8);

    macro_rules! tile256 {
        ($name:ident, $t:ty, $load:ident) => {
            /// # Safety
            /// The CPU has AVX2 and FMA; all rows are at least `x[0].len()` long.
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $name<const M: usize, const N: usize>(w: [&[$t]; M], x: [&[f32]; N]) -> [[f32; N]; M] {
                let k = x[0].len();
                let mut acc = [[_mm256_setzero_ps(); N]; M];
                let mut i = 0;
                while i + 8 <= k {
                    let mut xv = [_mm256_setzero_ps(); N];
                    for n in 0..N {
                        xv[n] = _mm256_loadu_ps(x[n].as_ptr().add(i));
                    }
                    for m in 0..M {
                        if N == 1 && i % 32 == 0 {
                            // As in tile512: prefetch the row M ahead (a hint; never faults).
                            _mm_prefetch::<_MM_HINT_T0>(w[m].as_ptr().wrapping_add(i + M * k) as *const i8);
                        }
                        let wv = $load(w[m].as_ptr().add(i));
                        for n in 0..N {
                            acc[m][n] = _mm256_fmadd_ps(wv, xv[n], acc[m][n]);
                        }
                    }
                    i += 8;
                }
                let mut out = [[0f32; N]; M];
                for m in 0..M {
                    for n in 0..N {
                        let mut s = hsum256(acc[m][n]);
                        for j in i..k {
                            s += w[m].get_unchecked(j).widen() * x[n].get_unchecked(j);
                        }
                        out[m][n] = s;
                    }
                }
                out
            }
        };
    }
    tile256!(tile256_f32, f32, load8_f32);
    tile256!(tile256_bf16, bf16, load8_bf16);
    tile256!(tile256_i8, i8, load8_i8);

    /// bf16 × bf16 pairs with f32 accumulation (`vdpbf16ps`).
    /// # Safety
    /// The CPU has AVX512-BF16 (and F/BW/VL); all rows are at least `x[0].len()` long.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn tile_dpbf16<const M: usize, const N: usize>(w: [&[bf16]; M], x: [&[bf16]; N]) -> [[f32; N]; M] {
        let k = x[0].len();
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let mut i = 0;
        while i + 32 <= k {
            let mut xv = [_mm512_setzero_si512(); N];
            for n in 0..N {
                xv[n] = _mm512_loadu_si512(x[n].as_ptr().add(i) as *const _);
            }
            for m in 0..M {
                if N == 1 {
                    // Decode: prefetch the next tile's rows, as in tile512 (a hint; never faults).
                    _mm_prefetch::<_MM_HINT_T0>(w[m].as_ptr().wrapping_add(i + M * k) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(w[m].as_ptr().wrapping_add(i + M * k + 32) as *const i8);
                }
                let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(w[m].as_ptr().add(i) as *const _));
                for n in 0..N {
                    acc[m][n] = _mm512_dpbf16_ps(acc[m][n], wv, std::mem::transmute::<__m512i, __m512bh>(xv[n]));
                }
            }
            i += 32;
        }
        let mut out = [[0f32; N]; M];
        for m in 0..M {
            for n in 0..N {
                let mut s = _mm512_reduce_add_ps(acc[m][n]);
                for j in i..k {
                    s += w[m].get_unchecked(j).widen() * x[n].get_unchecked(j).widen();
                }
                out[m][n] = s;
            }
        }
        out
    }
}

/// Prefill GEMM with AVX512-BF16 on packed weight panels (no horizontal sums): a panel holds 32
/// weight rows as [K/2][32 rows][2] bf16, so one 512-bit load gives 16 rows × one k-pair and each
/// activation row's k-pair is broadcast; `vdpbf16ps` accumulates 16 output columns per register.
#[cfg(target_arch = "x86_64")]
pub mod panel {
    use super::*;

    /// Weight rows per panel.
    pub const ROWS: usize = 32;
    /// Activation rows per register tile.
    pub const ACT_ROWS: usize = 8;

    /// Pack `rows` (≤ 32) weight rows of `k` (even) bf16 into `dst` [k/2][32][2], zero-padded.
    pub fn pack<W: WeightElem>(dst: &mut [u32], w: &[W], rows: usize, k: usize) {
        let kp = k / 2;
        assert!(dst.len() == kp * ROWS && w.len() >= rows * k && rows <= ROWS && k.is_multiple_of(2));
        if rows < ROWS {
            dst.fill(0);
        }
        for r in 0..rows {
            let row = &w[r * k..(r + 1) * k];
            for p in 0..kp {
                dst[p * ROWS + r] = row[2 * p].bf16_bits() as u32 | (row[2 * p + 1].bf16_bits() as u32) << 16;
            }
        }
    }

    /// out[n][j0 + c] = scale[c] · Σ_k panel[c][k] · x[n][k] for the panel's `cols` valid columns,
    /// N activation rows (bf16 pairs as u32, row stride `kp`).
    /// # Safety
    /// The CPU has AVX512-BF16 (and F/BW/VL); `panel` is [kp][32] u32; each x row has kp u32; `out`
    /// points at N rows of `out_stride` f32 with `cols` writable columns from column 0.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::needless_range_loop)] // indices pick registers of a fixed-size tile
    pub unsafe fn kernel<const N: usize>(
        panel: &[u32],
        x: [&[u32]; N],
        kp: usize,
        out: *mut f32,
        out_stride: usize,
        cols: usize,
        scale: Option<&[f32]>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; 2];
        let pp = panel.as_ptr();
        for p in 0..kp {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pp.add(p * ROWS) as *const _));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(pp.add(p * ROWS + 16) as *const _));
            for n in 0..N {
                let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x[n].get_unchecked(p) as i32));
                acc[0][n] = _mm512_dpbf16_ps(acc[0][n], w0, b);
                acc[1][n] = _mm512_dpbf16_ps(acc[1][n], w1, b);
            }
        }
        for h in 0..2 {
            let valid = cols.saturating_sub(h * 16).min(16);
            if valid == 0 {
                continue;
            }
            let mask: __mmask16 = if valid == 16 { 0xFFFF } else { (1u16 << valid) - 1 };
            let s = match scale {
                Some(s) => _mm512_maskz_loadu_ps(mask, s.as_ptr().add(h * 16)),
                None => _mm512_set1_ps(1.0),
            };
            for n in 0..N {
                _mm512_mask_storeu_ps(out.add(n * out_stride + h * 16), mask, _mm512_mul_ps(acc[h][n], s));
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// # Safety
    /// The CPU has NEON; `w.len() >= x.len()`.
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let k = x.len();
        let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut i = 0;
        while i + 8 <= k {
            a0 = vfmaq_f32(a0, vld1q_f32(w.as_ptr().add(i)), vld1q_f32(x.as_ptr().add(i)));
            a1 = vfmaq_f32(a1, vld1q_f32(w.as_ptr().add(i + 4)), vld1q_f32(x.as_ptr().add(i + 4)));
            i += 8;
        }
        let mut s = vaddvq_f32(vaddq_f32(a0, a1));
        while i < k {
            s += w[i] * x[i];
            i += 1;
        }
        s
    }

    /// # Safety
    /// The CPU has NEON; `w.len() >= x.len()`.
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
        let k = x.len();
        let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut i = 0;
        while i + 8 <= k {
            let raw = vld1q_u16(w.as_ptr().add(i) as *const u16);
            let lo = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(raw)));
            let hi = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_high_u16(raw)));
            a0 = vfmaq_f32(a0, lo, vld1q_f32(x.as_ptr().add(i)));
            a1 = vfmaq_f32(a1, hi, vld1q_f32(x.as_ptr().add(i + 4)));
            i += 8;
        }
        let mut s = vaddvq_f32(vaddq_f32(a0, a1));
        while i < k {
            s += w[i].widen() * x[i];
            i += 1;
        }
        s
    }
}

/// Dispatch a tile for one weight element type.
pub trait TileElem: WeightElem {
    fn tile<const M: usize, const N: usize>(isa: Isa, w: [&[Self]; M], x: [&[f32]; N]) -> [[f32; N]; M];
    /// These rows as bf16, when they are.
    fn as_bf16(_w: &[Self]) -> Option<&[bf16]> {
        None
    }
}

impl WeightElem for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// f16 weights (rare on CPU) use the scalar reference.
impl TileElem for half::f16 {
    fn tile<const M: usize, const N: usize>(_isa: Isa, w: [&[Self]; M], x: [&[f32]; N]) -> [[f32; N]; M] {
        check_rows(&w, &x);
        tile_scalar(w, x)
    }
}

fn check_rows<W, X, const M: usize, const N: usize>(w: &[&[W]; M], x: &[&[X]; N]) {
    let k = x[0].len();
    assert!(w.iter().all(|r| r.len() == k) && x.iter().all(|r| r.len() == k), "tile rows differ in length");
}

macro_rules! tile_elem {
    ($t:ty, $t512:ident, $t256:ident, $neon:ident $(, $as_bf16:item)?) => {
        impl TileElem for $t {
            $($as_bf16)?
            #[inline]
            fn tile<const M: usize, const N: usize>(isa: Isa, w: [&[$t]; M], x: [&[f32]; N]) -> [[f32; N]; M] {
                check_rows(&w, &x);
                match isa {
                    // SAFETY: `isa` comes from `Isa::available()`/`best()`, so the CPU has these
                    // features; check_rows made every row k long, so the kernels read in bounds.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::$t512(w, x) },
                    // SAFETY: as above, for AVX2+FMA.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { x86::$t256(w, x) },
                    #[cfg(target_arch = "aarch64")]
                    Isa::Neon => neon_tile!($neon, w, x, M, N),
                    _ => tile_scalar(w, x),
                }
            }
        }
    };
}

#[cfg(target_arch = "aarch64")]
macro_rules! neon_tile {
    (none, $w:ident, $x:ident, $m:ident, $n:ident) => {
        tile_scalar($w, $x)
    };
    ($f:ident, $w:ident, $x:ident, $m:ident, $n:ident) => {{
        let mut out = [[0f32; $n]; $m];
        for m in 0..$m {
            for n in 0..$n {
                // SAFETY: NEON was detected; check_rows made both rows k long.
                out[m][n] = unsafe { neon::$f($w[m], $x[n]) };
            }
        }
        out
    }};
}

tile_elem!(f32, tile512_f32, tile256_f32, dot_f32);
tile_elem!(
    bf16,
    tile512_bf16,
    tile256_bf16,
    dot_bf16,
    fn as_bf16(w: &[bf16]) -> Option<&[bf16]> {
        Some(w)
    }
);
tile_elem!(i8, tile512_i8, tile256_i8, none);

/// bf16 weights × bf16 activations (exact products, f32 sums); needs `Isa::Avx512Bf16`, else it
/// widens the activations and runs the f32 tile of `isa`.
pub fn tile_bf16_bf16<const M: usize, const N: usize>(isa: Isa, w: [&[bf16]; M], x: [&[bf16]; N]) -> [[f32; N]; M] {
    check_rows(&w, &x);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Bf16 {
        // SAFETY: Avx512Bf16 is only chosen when the CPU has it; rows are k long (check_rows).
        return unsafe { x86::tile_dpbf16(w, x) };
    }
    let mut out = [[0f32; N]; M];
    for n in 0..N {
        let xf: Vec<f32> = x[n].iter().map(|v| v.widen()).collect();
        let col = bf16::tile::<M, 1>(isa, w, [&xf]);
        for m in 0..M {
            out[m][n] = col[m][0];
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels, compiled once per level.

/// Defines `pub fn $name(isa, args)` running `$body` compiled for AVX-512, AVX2+FMA or baseline.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn v512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v256($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            match isa {
                // SAFETY: the body is safe Rust; the only requirement is that the CPU has the
                // features, which `isa` (from `Isa::available()`) guarantees.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 | Isa::Avx512Bf16 => unsafe { v512($($arg),*) },
                // SAFETY: as above, for AVX2+FMA.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { v256($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

/// f32 → nearest bf16 (ties to even) → f32, as `half::bf16::from_f32(x).to_f32()`, branch-free.
#[inline(always)]
pub fn round_bf16_one(x: f32) -> f32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    // NaN stays NaN (quieted), as half does; the rounding add could carry it into infinity.
    let nan = (b | 0x0040_0000) & 0xFFFF_0000;
    f32::from_bits(if x.is_nan() { nan } else { rounded })
}

/// e^x within ~2 ulp of `f32::exp` for finite x, branch-free so it vectorises (Cephes expf).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.33654, 88.72283);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // Two-part ln 2 so x - n·ln2 is exact enough.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2^n: n in [-126, 128) after the clamp; 2^128 is reached only at the overflow edge.
    let scale = f32::from_bits((((n as i32) + 127).clamp(1, 254) as u32) << 23);
    e * scale
}

multiversion! {
    /// v[i] = bf16 rounding of v[i].
    fn round_bf16(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = round_bf16_one(*x);
        }
    }
}

multiversion! {
    /// out = round(round(silu(gate)) * up) with `round` the bf16 rounding when `bf16` is set
    /// (transformers rounds silu(gate) before multiplying in bf16).
    fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32], bf16: bool) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            let mut a = g / (1.0 + exp_approx(-g));
            if bf16 {
                a = round_bf16_one(a);
            }
            let y = a * u;
            *o = if bf16 { round_bf16_one(y) } else { y };
        }
    }
}

multiversion! {
    /// In-place softmax with the vectorisable exp.
    fn softmax(v: &mut [f32]) {
        let mut mx = [f32::NEG_INFINITY; 16];
        let chunks = v.len() / 16;
        for c in 0..chunks {
            for l in 0..16 {
                mx[l] = mx[l].max(v[c * 16 + l]);
            }
        }
        let mut max = mx.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in &v[chunks * 16..] {
            max = max.max(x);
        }
        let mut acc = [0f32; 16];
        for c in 0..chunks {
            for l in 0..16 {
                let e = exp_approx(v[c * 16 + l] - max);
                v[c * 16 + l] = e;
                acc[l] += e;
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for x in v[chunks * 16..].iter_mut() {
            *x = exp_approx(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in v.iter_mut() {
            *x *= inv;
        }
    }
}

/// Σ x² with sixteen lanes (vectorises).
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.len() / 16;
    for c in 0..chunks {
        for l in 0..16 {
            acc[l] += x[c * 16 + l] * x[c * 16 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in &x[chunks * 16..] {
        s += v * v;
    }
    s
}

multiversion! {
    /// out = x / sqrt(mean(x²) + eps) * w (w f32).
    fn rms_norm_f32(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let inv = 1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = g * (v * inv);
        }
    }
}

multiversion! {
    /// out = x / sqrt(mean(x²) + eps) * w (w bf16).
    fn rms_norm_bf16(out: &mut [f32], x: &[f32], w: &[bf16], eps: f32) {
        let inv = 1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = g.widen() * (v * inv);
        }
    }
}

multiversion! {
    /// out += p · v (v f32).
    fn axpy_f32(out: &mut [f32], p: f32, v: &[f32]) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
}

multiversion! {
    /// out += p · v (v bf16).
    fn axpy_bf16(out: &mut [f32], p: f32, v: &[bf16]) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x.widen();
        }
    }
}

multiversion! {
    /// RoPE rotating halves (element i with i + hd/2).
    fn rope(v: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = v.len() / 2;
        let (a, b) = v.split_at_mut(half);
        for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
            let (u, w) = (*x1, *x2);
            *x1 = u * c - w * s;
            *x2 = w * c + u * s;
        }
    }
}

multiversion! {
    /// dst = bf16(src) (src already bf16-exact in bf16 compute, so this is a truncation).
    fn to_bf16(dst: &mut [bf16], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits((round_bf16_one(s).to_bits() >> 16) as u16);
        }
    }
}

multiversion! {
    /// dst = q as bf16 (integers up to 127 are exact in bf16).
    fn i8_to_bf16(dst: &mut [bf16], src: &[i8]) {
        for (d, &q) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(((q as f32).to_bits() >> 16) as u16);
        }
    }
}

multiversion! {
    /// out = Σ_j probs[j] · v[slots[j]..][..hd] (f32 cache), accumulated in key order.
    fn pv_f32(out: &mut [f32], probs: &[f32], v: &[f32], slots: &[usize]) {
        let hd = out.len();
        out.fill(0.0);
        for (&p, &s) in probs.iter().zip(slots) {
            for (o, &x) in out.iter_mut().zip(&v[s..s + hd]) {
                *o += p * x;
            }
        }
    }
}

multiversion! {
    /// out = Σ_j probs[j] · v[slots[j]..][..hd] (bf16 cache), accumulated in key order.
    fn pv_bf16(out: &mut [f32], probs: &[f32], v: &[bf16], slots: &[usize]) {
        let hd = out.len();
        out.fill(0.0);
        for (&p, &s) in probs.iter().zip(slots) {
            for (o, &x) in out.iter_mut().zip(&v[s..s + hd]) {
                *o += p * x.widen();
            }
        }
    }
}
