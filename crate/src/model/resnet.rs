//! ResNet-18 with torchvision's parameter names and initialisation.
use std::fmt;

use tch::nn::{self, Init, ModuleT};
use tch::Tensor;

/// A fully connected layer that prints like PyTorch's `nn.Linear`.
#[derive(Debug)]
pub struct Linear {
    pub ws: Tensor,
    pub bs: Tensor,
    pub in_features: i64,
    pub out_features: i64,
}

/// `nn.Linear(in_features, out_features)` with PyTorch's default initialisation: weight and bias
/// uniform in `±1/sqrt(in_features)` (`kaiming_uniform_(a=sqrt(5))` gives that bound).
pub fn linear(p: nn::Path, in_features: i64, out_features: i64) -> Linear {
    let bound = 1.0 / (in_features as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    Linear {
        ws: p.var("weight", &[out_features, in_features], init),
        bs: p.var("bias", &[out_features], init),
        in_features,
        out_features,
    }
}

impl Linear {
    /// PyTorch's repr: `Linear(in_features=512, out_features=1000, bias=True)`.
    pub fn repr(&self) -> String {
        format!(
            "Linear(in_features={}, out_features={}, bias=True)",
            self.in_features, self.out_features
        )
    }
}

impl fmt::Display for Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repr())
    }
}

impl nn::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.ws, Some(&self.bs))
    }
}

/// A convolution without bias, `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let fan_out = (c_out * k * k) as f64;
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init: Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_out).sqrt(),
        },
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, cfg)
}

/// BatchNorm with weight 1 and bias 0 (tch's default weight is uniform in (0, 1)).
fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        ws_init: Init::Const(1.0),
        bs_init: Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(p, c, cfg)
}

#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            (
                conv(p / "downsample" / "0", c_in, c_out, 1, stride, 0),
                bn(p / "downsample" / "1", c_out),
            )
        });
        BasicBlock {
            conv1: conv(p / "conv1", c_in, c_out, 3, stride, 1),
            bn1: bn(p / "bn1", c_out),
            conv2: conv(p / "conv2", c_out, c_out, 3, 1, 1),
            bn2: bn(p / "bn2", c_out),
            downsample,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .apply(&self.conv2)
            .apply_t(&self.bn2, train);
        let identity = match &self.downsample {
            Some((c, b)) => xs.apply(c).apply_t(b, train),
            None => xs.shallow_clone(),
        };
        (ys + identity).relu()
    }
}

/// torchvision's ResNet-18: the same layers, the same parameter names (`conv1`, `bn1`,
/// `layer1.0.conv1`, `layer2.0.downsample.0`, ..., `fc`), the same initialisation as
/// `resnet18(weights=None)`.
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
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
        conv1: conv(p / "conv1", 3, 64, 7, 2, 3),
        bn1: bn(p / "bn1", 64),
        layers,
        // Optimiser group 1, so that the output layer can get its own learning rate.
        fc: linear(p.set_group(1) / "fc", 512, num_classes),
    }
}

impl ResNet {
    /// Everything but `fc`: the pooled features.
    ///
    /// # Shapes
    /// `[n, 3, h, w]` -> `[n, 512]`
    pub fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut ys = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for block in self.layers.iter().flatten() {
            ys = block.forward_t(&ys, train);
        }
        ys.adaptive_avg_pool2d([1, 1]).flatten(1, -1) // [n, 512]
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        nn::Module::forward(&self.fc, &self.features(xs, train))
    }
}

fn conv_params(c: &nn::Conv2D) -> i64 {
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
        let fc = self.fc.ws.numel() as i64 + self.fc.bs.numel() as i64;
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
