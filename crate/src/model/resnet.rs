//! ResNet-18 with torchvision's parameter names and initialisation.
use std::fmt;

use tch::nn::{self, Init, ModuleT};
use tch::Tensor;

use super::conv::{conv2d, Conv2d};
use super::norm::{batch_norm_act, BN_EPS, BN_MOMENTUM};

/// A fully connected layer with PyTorch's names (`weight` `[out, in]`, `bias` `[out]`), printed
/// like PyTorch's `nn.Linear`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
    pub in_features: i64,
    pub out_features: i64,
}

/// `nn.Linear(in_features, out_features)` under `p` with PyTorch's default initialisation:
/// weight and bias uniform in `±1/sqrt(in_features)` (`kaiming_uniform_(a=sqrt(5))` gives that
/// bound).
pub fn linear(p: nn::Path, in_features: i64, out_features: i64) -> Linear {
    let bound = 1.0 / (in_features as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    Linear {
        weight: p.var("weight", &[out_features, in_features], init),
        bias: p.var("bias", &[out_features], init),
        in_features,
        out_features,
    }
}

impl Linear {
    /// A new layer named `name` in `vs` (`"fc"`), as assigning one in PyTorch:
    /// `net.fc = nn.Linear(512, 2)` is `net.fc = Linear::new(&vs, "fc", 512, 2)`. Variables of
    /// that name already in `vs` (the layer it replaces) leave it, so that saving, loading and
    /// `vs.variables()` see the new layer only.
    pub fn new(vs: &nn::VarStore, name: &str, in_features: i64, out_features: i64) -> Linear {
        {
            let mut vars = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
            for what in ["weight", "bias"] {
                if let Some(old) = vars.named_variables.remove(&format!("{name}.{what}")) {
                    vars.trainable_variables
                        .retain(|v| v.tensor.data_ptr() != old.data_ptr());
                }
            }
        }
        let p = name.split('.').fold(vs.root(), |p, part| p.sub(part));
        linear(p, in_features, out_features)
    }

    /// `weight` and `bias` (PyTorch's `parameters()`), sharing storage with the layer.
    pub fn parameters(&self) -> Vec<Tensor> {
        vec![self.weight.shallow_clone(), self.bias.shallow_clone()]
    }

    /// PyTorch's repr: `Linear(in_features=512, out_features=1000, bias=True)`.
    pub fn repr(&self) -> String {
        format!(
            "Linear(in_features={}, out_features={}, bias=True)",
            self.in_features, self.out_features
        )
    }
}

/// Prints as PyTorch does, so that a notebook cell whose value is `net.fc` shows what the
/// book's shows.
impl fmt::Debug for Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repr())
    }
}

impl fmt::Display for Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repr())
    }
}

impl nn::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, Some(&self.bias))
    }
}

/// BatchNorm with weight 1 and bias 0 (tch's default weight is uniform in (0, 1)).
fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        ws_init: Init::Const(1.0),
        bs_init: Init::Const(0.0),
        momentum: BN_MOMENTUM,
        eps: BN_EPS,
        ..Default::default()
    };
    nn::batch_norm2d(p, c, cfg)
}

/// [`batch_norm_act`] with the layers' momentum and eps (those [`bn`] builds them with).
fn bn_act(xs: &Tensor, b: &nn::BatchNorm, train: bool, id: Option<&Tensor>, relu: bool) -> Tensor {
    batch_norm_act(xs, b, train, BN_MOMENTUM, BN_EPS, id, relu)
}

#[derive(Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: nn::BatchNorm,
    conv2: Conv2d,
    bn2: nn::BatchNorm,
    downsample: Option<(Conv2d, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            (
                conv2d(p / "downsample" / "0", c_in, c_out, 1, stride, 0),
                bn(p / "downsample" / "1", c_out),
            )
        });
        BasicBlock {
            conv1: conv2d(p / "conv1", c_in, c_out, 3, stride, 1),
            bn1: bn(p / "bn1", c_out),
            conv2: conv2d(p / "conv2", c_out, c_out, 3, 1, 1),
            bn2: bn(p / "bn2", c_out),
            downsample,
        }
    }

    /// torchvision's `BasicBlock.forward`, with its in-place ReLUs and `out += identity`: each
    /// writes over a tensor no backward function needs (BatchNorm keeps its input, not its
    /// output), so the values and gradients are those of the out-of-place ops, with one pass over
    /// memory and one buffer fewer each.
    ///
    /// Each BatchNorm with what follows it (`bn1` and the ReLU; `bn2`, the addition and the
    /// ReLU) is one call of [`batch_norm_act`], one kernel on the CPU.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = bn_act(&xs.apply(&self.conv1), &self.bn1, train, None, true);
        let ys = ys.apply(&self.conv2);
        let identity = match &self.downsample {
            Some((c, b)) => bn_act(&xs.apply(c), b, train, None, false),
            None => xs.shallow_clone(),
        };
        bn_act(&ys, &self.bn2, train, Some(&identity), true)
    }
}

/// torchvision's ResNet-18: the same layers, the same parameter names (`conv1`, `bn1`,
/// `layer1.0.conv1`, `layer2.0.downsample.0`, ..., `fc`), the same initialisation as
/// `resnet18(weights=None)`.
#[derive(Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: nn::BatchNorm,
    layers: Vec<Vec<BasicBlock>>,
    /// The output layer.
    pub fc: Linear,
}

/// ResNet-18 with `num_classes` outputs under `p` (use `&vs.root()`).
pub fn resnet18(p: &nn::Path, num_classes: i64) -> ResNet {
    let widths = [64, 128, 256, 512];
    let mut c_in = 64;
    let layers = widths
        .iter()
        .enumerate()
        .map(|(i, &c_out)| {
            let lp = p / format!("layer{}", i + 1);
            let stride = if i == 0 { 1 } else { 2 };
            let blocks = vec![
                BasicBlock::new(&(&lp / "0"), c_in, c_out, stride),
                BasicBlock::new(&(&lp / "1"), c_out, c_out, 1),
            ];
            c_in = c_out;
            blocks
        })
        .collect();
    ResNet {
        conv1: conv2d(p / "conv1", 3, 64, 7, 2, 3),
        bn1: bn(p / "bn1", 64),
        layers,
        fc: linear(p / "fc", 512, num_classes),
    }
}

impl ResNet {
    /// Everything but `fc`: the pooled features.
    ///
    /// # Shapes
    /// `[n, 3, h, w]` -> `[n, 512]`
    pub fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = bn_act(&xs.apply(&self.conv1), &self.bn1, train, None, true);
        let mut ys = super::max_pool2d(&ys, 3, 2, 1);
        for block in self.layers.iter().flatten() {
            ys = block.forward_t(&ys, train);
        }
        ys.adaptive_avg_pool2d([1, 1]).flatten(1, -1) // [n, 512]
    }
}

impl ResNet {
    /// Every tensor of the model, parameters and BatchNorm buffers, with torchvision's names,
    /// in a fixed order (shallow copies: they share storage with the model).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        fn conv(out: &mut Vec<(String, Tensor)>, name: &str, c: &Conv2d) {
            out.push((format!("{name}.weight"), c.ws.shallow_clone()));
        }
        fn bn(out: &mut Vec<(String, Tensor)>, name: &str, b: &nn::BatchNorm) {
            for (what, t) in [("weight", &b.ws), ("bias", &b.bs)] {
                if let Some(t) = t {
                    out.push((format!("{name}.{what}"), t.shallow_clone()));
                }
            }
            out.push((
                format!("{name}.running_mean"),
                b.running_mean.shallow_clone(),
            ));
            out.push((format!("{name}.running_var"), b.running_var.shallow_clone()));
        }
        let mut out = Vec::with_capacity(102);
        conv(&mut out, "conv1", &self.conv1);
        bn(&mut out, "bn1", &self.bn1);
        for (i, layer) in self.layers.iter().enumerate() {
            for (j, block) in layer.iter().enumerate() {
                let p = format!("layer{}.{j}", i + 1);
                conv(&mut out, &format!("{p}.conv1"), &block.conv1);
                bn(&mut out, &format!("{p}.bn1"), &block.bn1);
                conv(&mut out, &format!("{p}.conv2"), &block.conv2);
                bn(&mut out, &format!("{p}.bn2"), &block.bn2);
                if let Some((c, b)) = &block.downsample {
                    conv(&mut out, &format!("{p}.downsample.0"), c);
                    bn(&mut out, &format!("{p}.downsample.1"), b);
                }
            }
        }
        out.push(("fc.weight".to_owned(), self.fc.weight.shallow_clone()));
        out.push(("fc.bias".to_owned(), self.fc.bias.shallow_clone()));
        out
    }

    /// The trainable tensors with their names (PyTorch's `named_parameters()`): every tensor
    /// but BatchNorm's running statistics, frozen ones included.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_tensors()
            .into_iter()
            .filter(|(name, _)| !name.contains(".running_"))
            .collect()
    }

    /// Freezes the body for the first stage of gradual unfreezing (fastai's `freeze()`): every
    /// parameter but the output layer `fc` stops learning (`requires_grad` off), except
    /// BatchNorm's weights and biases, which keep learning as fastai's `train_bn=True` has it (a
    /// frozen network still adapts its normalisation to the new data).
    pub fn freeze(&self) {
        for (name, p) in self.named_parameters() {
            let batch_norm =
                name.contains(".bn") || name.starts_with("bn") || name.contains("downsample.1.");
            let _ = p.set_requires_grad(name.starts_with("fc.") || batch_norm);
        }
    }

    /// Every parameter learns again (fastai's `unfreeze()`).
    pub fn unfreeze(&self) {
        for p in self.parameters() {
            let _ = p.set_requires_grad(true);
        }
    }

    /// PyTorch's `parameters()`: [`ResNet::named_parameters`] without the names.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }
}

impl crate::train::Replicate for ResNet {
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        ResNet::named_tensors(self)
    }

    fn replicate(&self, device: tch::Device) -> crate::Result<(nn::VarStore, ResNet)> {
        let vs = nn::VarStore::new(device);
        let copy = resnet18(&vs.root(), self.fc.out_features);
        let src = ResNet::named_tensors(self);
        tch::no_grad(|| -> crate::Result<()> {
            for ((_, dst), (_, src)) in copy.named_tensors().iter().zip(&src) {
                // The source's values with its kind and strides: a float64 or channels-last
                // model replicates as one (copy_ would cast into the new float32 NCHW tensors).
                let mut dst = dst.shallow_clone();
                dst.f_set_data(&src.f_to_device_(device, src.kind(), false, true)?)?;
                let _ = dst.set_requires_grad(src.requires_grad());
            }
            Ok(())
        })?;
        Ok((vs, copy))
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        nn::Module::forward(&self.fc, &self.features(xs, train))
    }
}

fn conv_params(c: &Conv2d) -> i64 {
    c.ws.numel() as i64
}

fn bn_params(b: &nn::BatchNorm) -> i64 {
    b.ws.as_ref().map_or(0, |w| w.numel() as i64) + b.bs.as_ref().map_or(0, |w| w.numel() as i64)
}

impl BasicBlock {
    fn params(&self) -> i64 {
        let down = self
            .downsample
            .as_ref()
            .map_or(0, |(c, b)| conv_params(c) + bn_params(b));
        conv_params(&self.conv1)
            + bn_params(&self.bn1)
            + conv_params(&self.conv2)
            + bn_params(&self.bn2)
            + down
    }
}

/// A short summary: each stage with its trainable parameter count.
impl fmt::Display for ResNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fc = self.fc.weight.numel() as i64 + self.fc.bias.numel() as i64;
        let mut rows = vec![
            (
                "conv1".to_owned(),
                "Conv2d(3, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)"
                    .to_owned(),
                conv_params(&self.conv1),
            ),
            (
                "bn1".to_owned(),
                "BatchNorm2d(64), ReLU, MaxPool2d(kernel_size=3, stride=2, padding=1)".to_owned(),
                bn_params(&self.bn1),
            ),
        ];
        let mut c_in = 64;
        for (i, layer) in self.layers.iter().enumerate() {
            let c_out = layer[0].bn1.ws.as_ref().map_or(0, |w| w.size()[0]);
            let stride = if i == 0 { 1 } else { 2 };
            let what = format!(
                "{} x BasicBlock({c_in} -> {c_out}, stride {stride})",
                layer.len()
            );
            rows.push((
                format!("layer{}", i + 1),
                what,
                layer.iter().map(BasicBlock::params).sum(),
            ));
            c_in = c_out;
        }
        rows.push((
            "avgpool".to_owned(),
            "AdaptiveAvgPool2d(output_size=(1, 1))".to_owned(),
            0,
        ));
        rows.push(("fc".to_owned(), self.fc.repr(), fc));
        let total: i64 = rows.iter().map(|r| r.2).sum();
        writeln!(f, "ResNet-18: {} trainable parameters", thousands(total))?;
        for (name, what, params) in rows {
            writeln!(f, "  {name:<8} {what:<78} {:>10}", thousands(params))?;
        }
        Ok(())
    }
}

fn thousands(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
