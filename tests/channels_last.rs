//! Channels-last (NHWC) memory format: the same training step as the default layout. Alone in
//! its test binary: run next to other libtorch tests in one process, the rounding of the two
//! steps drifts apart by up to 1e-2 (relative) at times, alone it stays near 5e-6.
use d2l::model::resnet18;
use d2l::tch::nn::VarStore;
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::*;

fn batch_of(n: i64, side: i64) -> (Tensor, Tensor) {
    d2l::tch::manual_seed(7);
    let x = Tensor::randn([n, 3, side, side], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&(0..n).map(|i| i % 2).collect::<Vec<i64>>());
    (x, y)
}

#[test]
fn channels_last_gives_nhwc_strides_and_the_same_step() {
    d2l::tch::manual_seed(1);
    let vs_a = VarStore::new(Device::Cpu);
    let a = resnet18(&vs_a.root(), 2);
    let (vs_b, b) = a.replicate(Device::Cpu).unwrap();
    convert_channels_last(&b).unwrap();
    let conv1 = &b.named_tensors()[0].1;
    assert_eq!(conv1.size(), [64, 3, 7, 7]);
    assert_eq!(conv1.stride(), [147, 1, 21, 3]);
    // 64 px and 8 images: BatchNorm's statistics in the last stage come from 32 values a
    // channel, so rounding differences stay rounding differences.
    let (x, y) = batch_of(8, 64);
    let nhwc = StepOptions {
        channels_last: true,
        ..StepOptions::default()
    };
    let before: Vec<Tensor> = a.named_tensors().iter().map(|(_, t)| t.copy()).collect();
    let mut opt_a = sgd(&vs_a, 0.01, 0.0, false).unwrap();
    let mut opt_b = sgd(&vs_b, 0.01, 0.0, false).unwrap();
    let la = DataParallel::new(&a, &[Device::Cpu])
        .unwrap()
        .train_batch(&x, &y, cross_entropy, &mut opt_a, &StepOptions::default())
        .unwrap();
    let lb = DataParallel::new(&b, &[Device::Cpu])
        .unwrap()
        .train_batch(&x, &y, cross_entropy, &mut opt_b, &nhwc)
        .unwrap();
    assert!((la.0 - lb.0).abs() < 1e-4 * la.0, "{la:?} vs {lb:?}");
    // The same update, up to the rounding of other convolution kernels (and of libtorch's
    // thread-dependent reductions, which BatchNorm's backward amplifies): compare the whole
    // step, |step_a - step_b| / |step_a| over all parameters.
    let (mut diff2, mut norm2) = (0.0, 0.0);
    for ((t0, (_, ta)), (_, tb)) in before.iter().zip(a.named_tensors()).zip(b.named_tensors()) {
        if ta.requires_grad() {
            let (da, db) = (&ta - t0, &tb - t0);
            diff2 += (&da - &db).square().sum(Kind::Double).double_value(&[]);
            norm2 += da.square().sum(Kind::Double).double_value(&[]);
        }
    }
    let rel = (diff2 / norm2).sqrt();
    assert!(
        norm2 > 0.0 && rel < 1e-4,
        "steps differ by {rel} (relative)"
    );
}
