//! config.json parsing: every official Qwen3 config, RoPE scaling spellings, and clear rejections.

use qwen3rs::config::{Qwen3Config, RopeScaling};
use qwen3rs::Error;
use std::path::Path;

fn official(name: &str) -> Qwen3Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/qwen3rs/configs").join(format!("{name}.json"));
    Qwen3Config::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn with(base: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Result<Qwen3Config, Error> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/qwen3rs/configs").join(format!("{base}.json"));
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    Qwen3Config::from_json(&v.to_string())
}

fn config_error(r: Result<Qwen3Config, Error>) -> String {
    match r {
        Err(Error::Config(m)) => m,
        Err(other) => panic!("expected a config error, got {other:?}"),
        Ok(_) => panic!("expected a config error, got a config"),
    }
}

#[test]
fn every_official_config_parses() {
    for (name, layers, moe) in [
        ("Qwen3-0.6B", 28, false),
        ("Qwen3-1.7B", 28, false),
        ("Qwen3-4B", 36, false),
        ("Qwen3-8B", 36, false),
        ("Qwen3-14B", 40, false),
        ("Qwen3-32B", 64, false),
        ("Qwen3-30B-A3B", 48, true),
        ("Qwen3-235B-A22B", 94, true),
    ] {
        let c = official(name);
        assert_eq!(c.num_hidden_layers, layers, "{name}");
        assert_eq!(c.num_experts > 0, moe, "{name}");
        assert_eq!(c.head_dim, 128, "{name}: head_dim is decoupled from hidden/heads");
        assert!((0..layers).all(|i| c.is_moe_layer(i) == moe), "{name}");
    }
    assert!(official("Qwen3-0.6B").tie_word_embeddings && !official("Qwen3-8B").tie_word_embeddings);
    assert_eq!(official("Qwen3-0.6B").q_dim(), 2048); // 16 heads × 128 ≠ hidden 1024
}

#[test]
fn moe_layer_placement_follows_sparse_step_and_mlp_only_layers() {
    let c = with("Qwen3-30B-A3B", |v| {
        v["num_hidden_layers"] = 6.into();
        v["decoder_sparse_step"] = 2.into();
        v["mlp_only_layers"] = serde_json::json!([3]);
    })
    .unwrap();
    let moe: Vec<bool> = (0..6).map(|i| c.is_moe_layer(i)).collect();
    assert_eq!(moe, [false, true, false, false, false, true]);
}

#[test]
fn rope_scaling_spellings() {
    let yarn = |key: &str| {
        with("Qwen3-8B", |v| v["rope_scaling"] = serde_json::json!({key: "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}))
            .unwrap()
    };
    for c in [yarn("rope_type"), yarn("type")] {
        match c.rope_scaling {
            // transformers replaces the factor by max_position_embeddings / original (40960 / 32768).
            RopeScaling::Yarn { factor, original_max_position_embeddings, .. } => {
                assert!((factor - 1.25).abs() < 1e-12);
                assert_eq!(original_max_position_embeddings, 32768);
            }
            other => panic!("{other:?}"),
        }
    }
    let no_original = with("Qwen3-8B", |v| v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})).unwrap();
    assert!(matches!(no_original.rope_scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));
    // transformers >= 5 nests the RoPE settings in rope_parameters.
    let v5 = with("Qwen3-8B", |v| {
        v.as_object_mut().unwrap().remove("rope_theta");
        v.as_object_mut().unwrap().remove("rope_scaling");
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 5e5});
    })
    .unwrap();
    assert_eq!(v5.rope_theta, 5e5);
    assert_eq!(v5.rope_scaling, RopeScaling::None);
    let linear = with("Qwen3-8B", |v| v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0})).unwrap();
    assert_eq!(linear.rope_scaling, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn rejections_name_the_problem() {
    assert!(
        config_error(with("Qwen3-8B", |v| v["architectures"] = serde_json::json!(["MistralForCausalLM"]))).contains("MistralForCausalLM")
    );
    assert!(config_error(with("Qwen3-8B", |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    }))
    .contains("hidden_size"));
    assert!(config_error(with("Qwen3-8B", |v| v["num_key_value_heads"] = 5.into())).contains("num_key_value_heads"));
    assert!(config_error(with("Qwen3-8B", |v| v["head_dim"] = 7.into())).contains("head_dim"));
    assert!(config_error(with("Qwen3-8B", |v| v["rms_norm_eps"] = (-1.0).into())).contains("rms_norm_eps"));
    assert!(config_error(with("Qwen3-8B", |v| v["rope_scaling"] = serde_json::json!({"rope_type": "yarn"}))).contains("factor"));
    assert!(config_error(with("Qwen3-8B", |v| v["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0})))
        .contains("dynamic"));
    assert!(config_error(with("Qwen3-8B", |v| v["hidden_act"] = "gelu".into())).contains("gelu"));
    assert!(config_error(with("Qwen3-30B-A3B", |v| v["num_experts_per_tok"] = 500.into())).contains("num_experts_per_tok"));
    assert!(config_error(with("Qwen3-8B", |v| v["vocab_size"] = 0.into())).contains("vocab_size"));
    assert!(config_error(Qwen3Config::from_json("[1, 2]")).contains("invalid config.json"));
}

/// Elements of every tensor in a checkpoint folder's safetensors files (their headers).
fn stored_elements(dir: &Path) -> usize {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            total += meta.tensors().values().map(|t| t.shape.iter().product::<usize>()).sum::<usize>();
        }
    }
    total
}

#[test]
fn weight_elements_count_every_tensor_of_a_checkpoint() {
    // The conformance checkpoints (transformers' own tensors: tied and untied heads, GQA, MoE layers
    // among dense ones, sharded files) hold exactly the elements the config says.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["dense_tied_bf16", "dense_untied_f32_gqa4", "dense_yarn_bf16", "moe_mixed_sharded_bf16", "moe_top2_bf16"] {
        let dir = fixtures.join(name);
        let c = Qwen3Config::from_file(&dir.join("config.json")).unwrap();
        assert_eq!(c.weight_elements(), stored_elements(&dir), "{name}");
    }
    // Hugging Face's model card figure for Qwen3-0.6B: 596,049,920 parameters.
    assert_eq!(official("Qwen3-0.6B").weight_elements(), 596_049_920);
}
