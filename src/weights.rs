//! Checkpoint weights: memory-mapped safetensors files (one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`), looked up by name and checked for dtype and shape. The model asks
//! a `TensorSource` for each tensor it needs, so real checkpoints and dummy weights load the same way.

use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};
use crate::{bail, ensure};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Anything that can hand out a checkpoint's tensors by name, with the shape the model expects.
pub trait TensorSource: Sync {
    /// The tensor `name`, which must have exactly `shape`; errors name the tensor.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor>;
    /// The dtype the checkpoint stores its weights in (for dtype="auto").
    fn stored_dtype(&self) -> DType;
    /// `Some(seed)` for dummy weights: the backend may then generate them itself
    /// (`Backend::dummy_weight`) instead of receiving host tensors.
    fn dummy_seed(&self) -> Option<u64> {
        None
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range of the data within the file.
    start: usize,
    len: usize,
}

/// The safetensors files of one checkpoint folder, memory-mapped.
pub struct SafetensorsWeights {
    paths: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
    entries: HashMap<String, Entry>,
}

impl SafetensorsWeights {
    /// Open the weights of a checkpoint folder: the shards named by `model.safetensors.index.json`,
    /// else `model.safetensors`, else every `*.safetensors` file in the folder.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files = if index.is_file() {
            shard_files(&index)?
        } else if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::NotFound {
                    path: dir.join("model.safetensors"),
                    what: "weights (no model.safetensors, model.safetensors.index.json or *.safetensors)".into(),
                });
            }
            found
        };
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut weights = SafetensorsWeights { paths: vec![], maps: vec![], entries: HashMap::new() };
        for path in files {
            weights.add_file(path)?;
        }
        Ok(weights)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the checkpoint file
        // not being truncated or rewritten by another process while the model is loaded.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| Error::Weights(format!("{}: not a valid safetensors file: {e}", path.display())))?;
        let data_start = 8 + header_len;
        let file_index = self.maps.len();
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                Dtype::F32 => DType::F32,
                Dtype::BF16 => DType::BF16,
                Dtype::F16 => DType::F16,
                other => bail!(Weights, "{}: tensor {name} has dtype {other:?}; qwen3rs reads F32, BF16 and F16", path.display()),
            };
            let (s, e) = info.data_offsets;
            let entry = Entry { file: file_index, dtype, shape: info.shape.clone(), start: data_start + s, len: e - s };
            ensure!(!self.entries.contains_key(&name), Weights, "tensor {name} appears in more than one file ({})", path.display());
            self.entries.insert(name, entry);
        }
        self.paths.push(path.to_path_buf());
        self.maps.push(Arc::new(map));
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }
}

impl TensorSource for SafetensorsWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let Some(e) = self.entries.get(name) else {
            bail!(Weights, "tensor {name} is missing from the checkpoint");
        };
        ensure!(e.shape == shape, Weights, "tensor {name} has shape {:?}, expected {shape:?} ({})", e.shape, self.paths[e.file].display());
        HostTensor::from_map(&self.maps[e.file], e.start, e.len, e.dtype, e.shape.clone())
    }

    fn stored_dtype(&self) -> DType {
        // The dtype of most weight bytes (norms are sometimes kept in f32 beside bf16 matrices).
        let mut bytes: HashMap<DType, usize> = HashMap::new();
        for e in self.entries.values() {
            *bytes.entry(e.dtype).or_default() += e.len;
        }
        bytes.into_iter().max_by_key(|&(_, n)| n).map(|(d, _)| d).unwrap_or(DType::BF16)
    }
}

/// The shard files named by a `model.safetensors.index.json`, in a stable order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Weights(format!("{}: invalid JSON: {e}", index.display())))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        bail!(Weights, "{}: no \"weight_map\" object", index.display());
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&str> = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else { bail!(Weights, "{}: weight_map[{tensor:?}] is not a file name", index.display()) };
        ensure!(
            !file.contains('/') && !file.contains('\\') && file != "..",
            Weights,
            "{}: weight_map[{tensor:?}] = {file:?} is not a file in the checkpoint folder",
            index.display()
        );
        if !names.contains(&file) {
            names.push(file);
        }
    }
    names.sort();
    ensure!(!names.is_empty(), Weights, "{}: weight_map is empty", index.display());
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}
