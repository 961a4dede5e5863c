//! Surviving an interrupted run: `train_ch13` with [`TrainOptions::checkpoint`] writes the whole
//! training state at the end of each epoch and, started again with the same arguments, resumes
//! from it, giving the history an uninterrupted run gives.
//!
//! [`TrainOptions::checkpoint`]: super::TrainOptions::checkpoint
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::ch13::{Point, Timing};
use crate::error::{Error, Result};
use crate::files::{write_atomically, AtomicFile};

/// The two files of a training checkpoint named `stem`: `<stem>.state.safetensors` (the model's
/// tensors as `model.<name>`, the optimiser's as `optim.<name>`) and `<stem>.state.json`
/// ([`TrainState`]).
pub fn training_state_paths(stem: &Path) -> (PathBuf, PathBuf) {
    use crate::model::stem_with;
    (
        stem_with(stem, ".state.safetensors"),
        stem_with(stem, ".state.json"),
    )
}

/// What a training checkpoint's JSON holds: where the run is, what it measured so far, and what
/// it was (its fingerprint must match the run that resumes it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs finished.
    pub epochs_done: usize,
    /// The run: epochs, batch size, batches an epoch, data set sizes, learning rates, the
    /// loader's seed, processes. A run with other values does not resume from this state.
    pub fingerprint: BTreeMap<String, String>,
    /// The training loader's epoch counter for the next epoch (its shuffle and augmentations are
    /// keyed by the seed and this).
    pub loader_epoch: u64,
    pub points: Vec<Point>,
    pub test_acc: f64,
    /// The last finished epoch's sums: loss, correct, examples, labels.
    pub metric: [f64; 4],
    /// Training examples so far.
    pub seen: f64,
    /// d2l's timer so far (the steps).
    pub step_s: f64,
    pub timing: Timing,
    /// SHA-256 of the `.safetensors` file, checked on load.
    pub tensors_sha256: String,
}

/// Writes the state: the tensors first, then the JSON naming their hash (each file whole or not
/// at all; a JSON and tensors from two saves are refused on load).
pub(crate) fn save(
    stem: &Path,
    state: &mut TrainState,
    model: &[(String, Tensor)],
    optim: &[(String, Tensor)],
) -> Result<()> {
    let (tensors_path, json) = training_state_paths(stem);
    if let Some(dir) = tensors_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let named = tch::no_grad(|| -> Result<Vec<(String, Tensor)>> {
        let prefixed = model
            .iter()
            .map(|(n, t)| (format!("model.{n}"), t))
            .chain(optim.iter().map(|(n, t)| (format!("optim.{n}"), t)));
        prefixed
            .map(|(n, t)| Ok((n, t.f_to_device(Device::Cpu)?.f_contiguous()?)))
            .collect()
    })?;
    let tmp = AtomicFile::create(&tensors_path)?;
    Tensor::write_safetensors(&named, tmp.temp_path())
        .map_err(|e| crate::model::torch_write_error(&tensors_path, e))?;
    state.tensors_sha256 = crate::model::sha256_file(tmp.temp_path())?;
    tmp.commit()?;
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::json(json.display(), e))?;
    write_atomically(&json, text.as_bytes())
}

/// The state saved under `stem`, if there is one: its JSON, the model's tensors and the
/// optimiser's (without their prefixes). A state whose fingerprint differs from `fingerprint`
/// is an error that names the first difference.
#[allow(clippy::type_complexity)]
pub(crate) fn load(
    stem: &Path,
    fingerprint: &BTreeMap<String, String>,
) -> Result<Option<(TrainState, Vec<(String, Tensor)>, Vec<(String, Tensor)>)>> {
    let (tensors_path, json) = training_state_paths(stem);
    let text = match std::fs::read_to_string(&json) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&json, e)),
    };
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Weights {
        path: json.clone(),
        msg: format!("not a training state ({e}); delete it to start afresh"),
    })?;
    for key in fingerprint.keys().chain(state.fingerprint.keys()) {
        let (now, saved) = (fingerprint.get(key), state.fingerprint.get(key));
        if now != saved {
            return Err(Error::arg(
                "train_ch13",
                format!(
                    "{} is a checkpoint of another run ({key}: {} there, {} here); delete it, or \
                     give another checkpoint path",
                    json.display(),
                    saved.map_or("none", String::as_str),
                    now.map_or("none", String::as_str)
                ),
            ));
        }
    }
    crate::model::check_sha256(
        &tensors_path,
        &state.tensors_sha256,
        &json,
        "delete both to start afresh",
    )?;
    let all = Tensor::read_safetensors(&tensors_path).map_err(|e| Error::Weights {
        path: tensors_path.clone(),
        msg: e.to_string(),
    })?;
    let (mut model, mut optim) = (Vec::new(), Vec::new());
    for (name, t) in all {
        if let Some(n) = name.strip_prefix("model.") {
            model.push((n.to_owned(), t));
        } else if let Some(n) = name.strip_prefix("optim.") {
            optim.push((n.to_owned(), t));
        }
    }
    Ok(Some((state, model, optim)))
}

/// Copies the saved model tensors into `tensors` (the model's, by name), refusing a missing or
/// extra name or another shape.
pub(crate) fn restore_model(
    tensors: &[(String, Tensor)],
    saved: &[(String, Tensor)],
    path: &Path,
) -> Result<()> {
    let saved: BTreeMap<&str, &Tensor> = saved.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if saved.len() != tensors.len() {
        return Err(Error::Weights {
            path: path.to_owned(),
            msg: format!(
                "{} model tensors saved, the model has {}",
                saved.len(),
                tensors.len()
            ),
        });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, t) in tensors {
            let s = saved.get(name.as_str()).ok_or_else(|| Error::Weights {
                path: path.to_owned(),
                msg: format!("no saved tensor {name}"),
            })?;
            if s.size() != t.size() {
                return Err(Error::Weights {
                    path: path.to_owned(),
                    msg: format!(
                        "{name}: shape {:?} saved, {:?} in the model",
                        s.size(),
                        t.size()
                    ),
                });
            }
            t.shallow_clone().f_copy_(s)?;
        }
        Ok(())
    })
}
