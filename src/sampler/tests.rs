//! Sampler tests. Expected values come from a separate, deliberately naive reference (f64 softmax,
//! full sorts, the vLLM formulas written out), never from the code under test.

use super::*;
use crate::error::Error;

/// Deterministic pseudo-random logits in [-scale, scale) (xorshift; independent of ChaCha).
fn logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p, min_p, seed: 1234, ..Default::default() }
}

/// The distribution vLLM samples from, computed naively: softmax(l / T), drop p < min_p·p_max,
/// keep the top_k largest, renormalise, keep while the mass ranked above is < top_p, renormalise.
fn reference(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / p.temperature as f64).collect();
    let softmax = |keep: &[bool]| -> Vec<f64> {
        let max = scaled.iter().zip(keep).filter(|(_, &k)| k).map(|(&l, _)| l).fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scaled.iter().zip(keep).map(|(&l, &k)| if k { (l - max).exp() } else { 0.0 }).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    };
    let mut keep = vec![true; logits.len()];
    let probs = softmax(&keep);
    let pmax = probs.iter().cloned().fold(0.0, f64::max);
    for (k, &q) in keep.iter_mut().zip(&probs) {
        *k = q >= p.min_p as f64 * pmax;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| scaled[b].partial_cmp(&scaled[a]).unwrap().then(a.cmp(&b)));
    if p.top_k > 0 {
        let survivors: Vec<usize> = order.iter().copied().filter(|&i| keep[i]).collect();
        for &i in survivors.iter().skip(p.top_k) {
            keep[i] = false;
        }
    }
    let probs = softmax(&keep);
    let mut above = 0.0;
    for &i in &order {
        if keep[i] {
            if above >= p.top_p as f64 {
                keep[i] = false;
            }
            above += probs[i];
        }
    }
    softmax(&keep)
}

fn kept(dist: &[f64]) -> Vec<usize> {
    (0..dist.len()).filter(|&i| dist[i] > 0.0).collect()
}

/// Pearson chi-square of observed counts against `dist`; panics if a zero-probability token was drawn.
fn chi_square(counts: &[u64], dist: &[f64], draws: u64) -> f64 {
    let mut chi2 = 0.0;
    for (i, (&c, &q)) in counts.iter().zip(dist).enumerate() {
        if q == 0.0 {
            assert_eq!(c, 0, "token {i} was excluded but sampled {c} times");
        } else {
            let expected = q * draws as f64;
            chi2 += (c as f64 - expected).powi(2) / expected;
        }
    }
    chi2
}

fn draw_counts(logits: &[f32], p: &SamplingParams, draws: u64) -> Vec<u64> {
    let mut s = Sampler::new(p.clone(), &[]).unwrap();
    let mut counts = vec![0u64; logits.len()];
    for _ in 0..draws {
        counts[s.sample(logits, &[]).unwrap().token as usize] += 1;
    }
    counts
}

const SMALL: [f32; 8] = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0];

#[test]
fn reference_filters_keep_the_hand_computed_sets() {
    // Guards the reference itself. softmax(SMALL) ≈ [.4046 .2454 .1488 .0903 .0548 .0332 .0201 .0027].
    assert_eq!(kept(&reference(&SMALL, &params(1.0, 3, 1.0, 0.0))), vec![0, 1, 2]);
    // Mass above: 0, .4046, .6500, .7988, .8891 → keep while < 0.8: tokens 0..=3.
    assert_eq!(kept(&reference(&SMALL, &params(1.0, 0, 0.8, 0.0))), vec![0, 1, 2, 3]);
    assert_eq!(kept(&reference(&SMALL, &params(1.0, 0, 0.79, 0.0))), vec![0, 1, 2]);
    // min_p 0.2: p_i / p_0 = e^(l_i - 2) >= 0.2 ⇔ l_i >= 2 + ln 0.2 ≈ 0.39: tokens 0..=3.
    assert_eq!(kept(&reference(&SMALL, &params(1.0, 0, 1.0, 0.2))), vec![0, 1, 2, 3]);
    let d = reference(&SMALL, &params(1.0, 0, 1.0, 0.0));
    assert!((d[0] - 0.4046).abs() < 1e-4 && (d[7] - 0.0027).abs() < 1e-4);
}

#[test]
fn empirical_frequencies_match_the_filtered_distribution() {
    let draws = 100_000;
    let cases = [
        params(1.0, 0, 1.0, 0.0),
        params(0.7, 3, 1.0, 0.0),
        params(1.3, 0, 0.8, 0.0),
        params(1.0, 0, 1.0, 0.2),
        params(0.8, 5, 0.9, 0.05),
        params(2.5, 6, 0.95, 0.0),
    ];
    for p in cases {
        let dist = reference(&SMALL, &p);
        let counts = draw_counts(&SMALL, &p, draws);
        let chi2 = chi_square(&counts, &dist, draws);
        // df ≤ 7; the 0.999 quantile of chi-square(7) is 24.3. Fixed seed: no flakiness.
        assert!(chi2 < 24.3, "{p:?}: chi2 {chi2}, counts {counts:?}, expected {dist:?}");
    }
}

#[test]
fn large_vocab_filters_and_logprobs_match_reference_exactly() {
    // Flat-ish logits over 5000 tokens force top_p to grow its sorted prefix past 64 several times.
    let l = logits(5000, 7, 2.0);
    let cases = [params(1.0, 0, 0.9, 0.0), params(0.6, 20, 0.95, 0.0), params(1.0, 0, 1.0, 0.5), params(0.9, 300, 0.7, 0.1)];
    for mut p in cases {
        let dist = reference(&l, &p);
        let expect = kept(&dist);
        assert!(expect.len() > 1 && expect.len() < l.len(), "{p:?} should filter something");
        p.logprobs = l.len();
        let mut s = Sampler::new(p.clone(), &[]).unwrap();
        for _ in 0..200 {
            let out = s.sample(&l, &[]).unwrap();
            assert!(dist[out.token as usize] > 0.0, "{p:?}: sampled excluded token {}", out.token);
            assert!((out.logprob as f64 - dist[out.token as usize].ln()).abs() < 1e-4);
            // Every survivor, most likely first, with log p of the filtered distribution.
            let mut listed: Vec<usize> = out.top_logprobs.iter().map(|&(t, _)| t as usize).collect();
            for w in out.top_logprobs.windows(2) {
                assert!(w[0].1 >= w[1].1);
            }
            for &(t, lp) in &out.top_logprobs {
                assert!((lp as f64 - dist[t as usize].ln()).abs() < 1e-4, "{p:?}: token {t}");
            }
            listed.sort_unstable();
            assert_eq!(listed, expect, "{p:?}");
        }
    }
}

#[test]
fn greedy_is_argmax_with_ties_to_lowest_id() {
    let l = logits(1000, 3, 5.0);
    let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
    for (i, &v) in l.iter().enumerate() {
        if v > best_v {
            (best, best_v) = (i, v);
        }
    }
    // Filters are ignored in greedy mode.
    for p in [params(0.0, 0, 1.0, 0.0), params(0.0, 1, 0.1, 0.9), params(1e-6, 0, 1.0, 0.0)] {
        let mut s = Sampler::new(p, &[]).unwrap();
        for _ in 0..3 {
            assert_eq!(s.sample(&l, &[]).unwrap().token, best as u32);
        }
    }
    let mut s = Sampler::new(params(0.0, 0, 1.0, 0.0), &[]).unwrap();
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, -1.0], &[]).unwrap().token, 1);
    assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
}

#[test]
fn greedy_logprobs_are_log_softmax_of_the_logits() {
    let l = [1.0f32, 2.0, 0.5, -1.0, 2.0];
    let mut s = Sampler::new(SamplingParams { logprobs: 3, ..Default::default() }, &[]).unwrap();
    let out = s.sample(&l, &[]).unwrap();
    let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
    let lp = |i: usize| (l[i] as f64 - z.ln()) as f32;
    assert_eq!(out.token, 1);
    assert!((out.logprob - lp(1)).abs() < 1e-6);
    let ids: Vec<u32> = out.top_logprobs.iter().map(|&(t, _)| t).collect();
    assert_eq!(ids, vec![1, 4, 0]);
    for &(t, v) in &out.top_logprobs {
        assert!((v - lp(t as usize)).abs() < 1e-6);
    }
    // No logprobs requested → no list, but the sampled token's logprob is still reported.
    let mut s = Sampler::new(SamplingParams::default(), &[]).unwrap();
    let out = s.sample(&l, &[]).unwrap();
    assert!(out.top_logprobs.is_empty() && (out.logprob - lp(1)).abs() < 1e-6);
}

/// Processed logits as seen through logprobs: log-softmax of all tokens, in id order.
fn all_logprobs(p: SamplingParams, prompt: &[u32], l: &[f32], generated: &[u32]) -> Vec<f64> {
    let p = SamplingParams { logprobs: l.len(), ..p };
    let out = Sampler::new(p, prompt).unwrap().sample(l, generated).unwrap();
    let mut v = vec![f64::NEG_INFINITY; l.len()];
    for (t, lp) in out.top_logprobs {
        v[t as usize] = lp as f64;
    }
    v
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = x.iter().map(|v| (v - max).exp()).sum();
    x.iter().map(|v| v - max - z.ln()).collect()
}

fn assert_close(got: &[f64], want: &[f64]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-5, "token {i}: got {g}, want {w}\n got {got:?}\nwant {want:?}");
    }
}

#[test]
fn penalties_follow_the_vllm_formulas() {
    let l = [2.0f32, -1.0, 0.5, 3.0, -2.0, 1.0];
    let prompt = [0u32, 1, 0];
    let generated = [1u32, 2, 2, 2, 3];
    let p = SamplingParams { repetition_penalty: 1.5, presence_penalty: 0.25, frequency_penalty: 0.125, ..Default::default() };
    // Repetition (prompt ∪ generated = {0,1,2,3}, once each): 2/1.5, -1·1.5, 0.5/1.5, 3/1.5.
    // Then generated only: minus 0.125·count + 0.25 for tokens 1 (×1), 2 (×3), 3 (×1).
    let want = [2.0 / 1.5, -1.5 - (0.125 + 0.25), 0.5 / 1.5 - (0.375 + 0.25), 3.0 / 1.5 - (0.125 + 0.25), -2.0, 1.0];
    assert_close(&all_logprobs(p.clone(), &prompt, &l, &generated), &log_softmax(&want));

    // Temperature applies after penalties.
    let hot = SamplingParams { temperature: 0.5, ..p.clone() };
    let scaled: Vec<f64> = want.iter().map(|v| v / 0.5).collect();
    assert_close(&all_logprobs(hot, &prompt, &l, &generated), &log_softmax(&scaled));

    // Presence/frequency ignore the prompt; repetition alone covers it.
    let only_pf = SamplingParams { presence_penalty: 1.0, frequency_penalty: 1.0, ..Default::default() };
    let want_pf: Vec<f64> = l.iter().map(|&v| v as f64).collect();
    assert_close(&all_logprobs(only_pf, &prompt, &l, &[]), &log_softmax(&want_pf));

    // A penalty can change the greedy choice: token 3 (3.0) falls below token 0 (2.0).
    let mut s = Sampler::new(SamplingParams { frequency_penalty: 2.0, ..Default::default() }, &[]).unwrap();
    assert_eq!(s.sample(&l, &[]).unwrap().token, 3);
    assert_eq!(s.sample(&l, &[3]).unwrap().token, 0);
    // Scratch counts are reset between calls: the same call twice gives the same result.
    assert_eq!(s.sample(&l, &[]).unwrap().token, 3);
}

#[test]
fn same_seed_same_tokens() {
    let l = logits(2000, 11, 3.0);
    let run = |seed: u64| {
        let p = SamplingParams { seed, ..params(1.0, 50, 0.95, 0.0) };
        let mut s = Sampler::new(p, &[]).unwrap();
        (0..200).map(|_| s.sample(&l, &[]).unwrap().token).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn nan_and_infinite_logits_do_not_panic() {
    let l = [f32::NAN, 1.0, f32::INFINITY, f32::NEG_INFINITY];
    for p in [params(0.0, 0, 1.0, 0.0), params(1.0, 0, 1.0, 0.0), params(0.3, 2, 0.5, 0.1)] {
        let mut s = Sampler::new(SamplingParams { logprobs: 4, ..p }, &[]).unwrap();
        let out = s.sample(&l, &[]).unwrap();
        assert_eq!(out.token, 2);
        assert!(out.logprob.is_finite());
        assert!(out.top_logprobs.iter().all(|&(t, _)| t == 1 || t == 2));
    }
    let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0), &[]).unwrap();
    for bad in [&[][..], &[f32::NAN, f32::NEG_INFINITY][..]] {
        assert!(matches!(s.sample(bad, &[]), Err(Error::InvalidArgument(_))));
    }
    assert!(matches!(s.sample(&[1.0, 2.0], &[2]), Err(Error::InvalidArgument(m)) if m.contains("2")));
    let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0), &[5]).unwrap();
    assert!(matches!(s.sample(&[1.0, 2.0], &[]), Err(Error::InvalidArgument(m)) if m.contains("prompt token id 5")));
}

#[test]
fn invalid_values_are_rejected_naming_parameter_and_value() {
    let base = SamplingParams::default();
    let cases: Vec<(SamplingParams, &str)> = vec![
        (SamplingParams { temperature: -0.5, ..base.clone() }, "temperature"),
        (SamplingParams { temperature: f32::NAN, ..base.clone() }, "temperature"),
        (SamplingParams { temperature: f32::INFINITY, ..base.clone() }, "temperature"),
        (SamplingParams { top_p: 0.0, ..base.clone() }, "top_p"),
        (SamplingParams { top_p: 1.5, ..base.clone() }, "top_p"),
        (SamplingParams { top_p: f32::NAN, ..base.clone() }, "top_p"),
        (SamplingParams { min_p: -0.1, ..base.clone() }, "min_p"),
        (SamplingParams { min_p: 1.5, ..base.clone() }, "min_p"),
        (SamplingParams { repetition_penalty: 0.0, ..base.clone() }, "repetition_penalty"),
        (SamplingParams { repetition_penalty: -1.0, ..base.clone() }, "repetition_penalty"),
        (SamplingParams { presence_penalty: 2.5, ..base.clone() }, "presence_penalty"),
        (SamplingParams { frequency_penalty: -3.0, ..base.clone() }, "frequency_penalty"),
        (SamplingParams { frequency_penalty: f32::NAN, ..base.clone() }, "frequency_penalty"),
    ];
    for (p, name) in cases {
        match Sampler::new(p.clone(), &[]) {
            Err(Error::InvalidArgument(m)) => assert!(m.starts_with(name) && m.contains("got"), "{m}"),
            Err(e) => panic!("{p:?}: wrong error {e:?}"),
            Ok(_) => panic!("{p:?} accepted"),
        }
    }
    match (SamplingParams { top_p: 1.5, ..base.clone() }).validate() {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("1.5"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Edges that are valid.
    for p in [
        SamplingParams { top_p: 1.0, min_p: 1.0, presence_penalty: -2.0, frequency_penalty: 2.0, ..base.clone() },
        SamplingParams { temperature: 100.0, top_k: 1, repetition_penalty: 0.01, ..base.clone() },
    ] {
        assert!(Sampler::new(p, &[]).is_ok());
    }
}

#[test]
fn mode_defaults_and_overrides() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/qwen3rs/tokenizer");
    let generation = GenerationConfig::from_dir(&dir).unwrap();
    let fixed = SamplingOverrides { seed: Some(5), ..Default::default() };

    let thinking = SamplingParams::for_mode(true, &generation, &fixed).unwrap();
    assert_eq!((thinking.temperature, thinking.top_p, thinking.top_k, thinking.min_p), (0.6, 0.95, 20, 0.0));
    assert_eq!((thinking.seed, thinking.repetition_penalty), (5, 1.0));

    let chat = SamplingParams::for_mode(false, &generation, &fixed).unwrap();
    assert_eq!((chat.temperature, chat.top_p, chat.top_k, chat.min_p), (0.7, 0.8, 20, 0.0));

    let explicit = SamplingOverrides { temperature: Some(0.0), top_k: Some(0), logprobs: Some(5), seed: Some(9), ..Default::default() };
    let p = SamplingParams::for_mode(true, &generation, &explicit).unwrap();
    assert_eq!((p.temperature, p.top_k, p.top_p, p.logprobs, p.seed), (0.0, 0, 0.95, 5, 9));

    let bad = SamplingOverrides { top_p: Some(2.0), ..Default::default() };
    assert!(matches!(SamplingParams::for_mode(false, &generation, &bad), Err(Error::InvalidArgument(_))));

    let greedy_config = GenerationConfig::from_json(r#"{"do_sample": false, "temperature": 0.9, "repetition_penalty": 1.1}"#).unwrap();
    let p = SamplingParams::for_mode(true, &greedy_config, &fixed).unwrap();
    assert_eq!((p.temperature, p.top_p, p.repetition_penalty), (0.0, 0.95, 1.1));
    assert_eq!(GenerationConfig::from_dir(std::path::Path::new("/nonexistent")).unwrap(), GenerationConfig::default());
    assert!(matches!(GenerationConfig::from_json("{"), Err(Error::Config(_))));
}

#[test]
fn fast_exp_matches_libm() {
    assert_eq!(exp_neg(0.0), 1.0);
    assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_neg(-1000.0), 0.0);
    let mut worst = 0.0f64;
    for i in 0..=870_000 {
        let x = -(i as f32) * 1e-4;
        let want = (x as f64).exp();
        worst = worst.max(((exp_neg(x) as f64) - want).abs() / want);
    }
    assert!(worst < 3e-7, "worst relative error {worst}");
}

#[test]
fn scan_top_n_equals_a_full_sort() {
    // Many ties (values quantised to 0.5) to check the lower-id-first order.
    let l: Vec<f32> = logits(3000, 9, 4.0).iter().map(|v| (v * 2.0).round() / 2.0).collect();
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap().then(a.cmp(&b)));
    for (n, floor) in [(1, f32::NEG_INFINITY), (20, f32::NEG_INFINITY), (64, 3.5), (64, f32::NEG_INFINITY)] {
        let mut out = Vec::new();
        scan_top_n(l.iter().copied(), n, floor, &mut out);
        let want: Vec<u32> = order.iter().filter(|&&i| l[i] >= floor).take(n).map(|&i| i as u32).collect();
        assert_eq!(out.iter().map(|c| c.1).collect::<Vec<_>>(), want, "n {n} floor {floor}");
    }
}

#[test]
fn top_scaled_is_the_scaled_rows_best_in_rank_order() {
    // Ties (quantised values), -0 and +0, NaN, ±inf; against a full sort of the scaled row.
    let mut l: Vec<f32> = logits(5000, 21, 6.0).iter().map(|v| (v * 2.0).round() / 2.0).collect();
    (l[3], l[17], l[40], l[41], l[99]) = (f32::NAN, f32::INFINITY, -0.0, 0.0, f32::NEG_INFINITY);
    for (k, inv_t) in [(1, 1.0), (20, 1.0 / 0.6), (64, 1.0 / 0.7), (7, 3.0)] {
        let scaled: Vec<f32> = l.iter().map(|&v| (sanitize(v) * inv_t).min(f32::MAX)).collect();
        let mut order: Vec<usize> = (0..l.len()).filter(|&i| scaled[i] > f32::NEG_INFINITY).collect();
        order.sort_by(|&a, &b| scaled[b].partial_cmp(&scaled[a]).unwrap().then(a.cmp(&b)));
        let want: Vec<(f32, u32)> = order.iter().take(k).map(|&i| (scaled[i], i as u32)).collect();
        assert_eq!(top_scaled(&l, k, inv_t), want, "k {k}");
    }
    assert!(top_scaled(&l, 0, 1.0).is_empty());
    assert!(top_scaled(&[f32::NAN, f32::NEG_INFINITY], 4, 1.0).is_empty());
}

#[test]
fn sampling_from_the_top_equals_sampling_from_the_row() {
    // For every top-k sampler without penalties, sample_top(top_scaled(row)) draws what sample(row)
    // draws, step after step (the same random stream), logprobs included; the rows have ties.
    let mut rows: Vec<Vec<f32>> = (0..6).map(|s| logits(4099, 30 + s, 8.0).iter().map(|v| (v * 4.0).round() / 4.0).collect()).collect();
    for (i, row) in rows.iter_mut().enumerate().skip(3) {
        row[100 * i] = 12.0; // peaked rows, where min_p and top_p cut inside the top k
        row[100 * i + 1] = 9.5;
    }
    let cases = [(0.6, 20, 0.95, 0.0, 0), (0.7, 20, 0.8, 0.0, 3), (1.0, 64, 1.0, 0.05, 5), (1.3, 1, 1.0, 0.0, 1), (0.2, 7, 0.5, 0.1, 2)];
    for (t, k, top_p, min_p, lp) in cases {
        let p = SamplingParams { logprobs: lp, ..params(t, k, top_p, min_p) };
        let (mut full, mut top) = (Sampler::new(p.clone(), &[1, 2]).unwrap(), Sampler::new(p.clone(), &[1, 2]).unwrap());
        let (want_k, inv_t) = top.wants_top(4099).expect("a top-k sampler without penalties");
        assert_eq!((want_k, inv_t), (k, 1.0 / t));
        for row in rows.iter().cycle().take(30) {
            let a = full.sample(row, &[]).unwrap();
            let b = top.sample_top(&top_scaled(row, want_k, inv_t)).unwrap();
            assert_eq!(a, b, "{p:?}");
        }
    }
    // Not for greedy, penalties, no top-k, or a top-k past 64 or the vocabulary.
    for p in [
        params(0.0, 20, 1.0, 0.0),
        SamplingParams { repetition_penalty: 1.1, ..params(0.6, 20, 0.95, 0.0) },
        params(0.6, 0, 0.95, 0.0),
        params(0.6, 65, 0.95, 0.0),
        params(0.6, 100, 1.0, 0.0),
    ] {
        assert_eq!(Sampler::new(p.clone(), &[]).unwrap().wants_top(100), None, "{p:?}");
    }
    // A row with nothing to sample is the same error both ways.
    let mut s = Sampler::new(params(0.6, 20, 0.95, 0.0), &[]).unwrap();
    assert!(s.sample_top(&top_scaled(&[f32::NAN; 8], 20, 1.0)).is_err());
}
