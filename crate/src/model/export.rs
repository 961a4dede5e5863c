//! Shipping a fine-tuned model: TorchScript that PyTorch loads with `torch.jit.load`.
use std::path::Path;

use tch::nn::ModuleT;
use tch::{CModule, Device, Kind, Tensor};

use super::ResNet;
use crate::error::{Error, Result};
use crate::files::AtomicFile;
use crate::train::Replicate;

/// Writes `net` as TorchScript to `path` (PyTorch's `torch.jit.trace(net.eval(), x).save(path)`):
/// the network in eval mode (BatchNorm with its running statistics), traced on the CPU with a
/// `[1, 3, crop, crop]` float32 input, so the file loads on any machine
/// (`torch.jit.load(path)`, then `.to(device)`), takes any batch size, and returns logits.
/// The weights are stored in the file; it appears whole or not at all.
pub fn export_torchscript(net: &ResNet, path: impl AsRef<Path>, crop: u32) -> Result<()> {
    let path = path.as_ref();
    if crop < 32 {
        return Err(Error::arg(
            "export_torchscript",
            format!("crop {crop}: ResNet-18 needs at least 32 x 32 pixels"),
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    // A float32, standard-layout CPU copy: what a user of the file on any device expects.
    let (_vs, cpu) = net.replicate(Device::Cpu)?;
    tch::no_grad(|| -> Result<()> {
        for (_, t) in cpu.named_tensors() {
            let mut t = t.shallow_clone();
            t.f_set_data(&t.f_to_kind(Kind::Float)?.f_contiguous()?)?;
            // Traced values are stored as constants, which must not require gradients.
            let _ = t.set_requires_grad(false);
        }
        Ok(())
    })?;
    let example = Tensor::f_zeros([1, 3, crop as i64, crop as i64], (Kind::Float, Device::Cpu))?;
    // libtorch's convolution: the im2col path's reshapes would fix the traced batch size.
    let module = super::conv::with_libtorch_conv(|| {
        tch::no_grad(|| {
            CModule::create_by_tracing("ResNet", "forward", &[example], &mut |xs| {
                vec![cpu.forward_t(&xs[0], false)]
            })
        })
    })
    .map_err(|e| Error::Weights {
        path: path.to_owned(),
        msg: format!("tracing the model failed: {e}"),
    })?;
    let tmp = AtomicFile::create(path)?;
    module
        .save(tmp.temp_path())
        .map_err(|e| super::torch_write_error(path, e))?;
    tmp.commit().map(drop)
}
