//! Devices and versions as d2l reports them, on a machine with or without a GPU.
use d2l::tch::Device;

#[test]
fn device_repr_matches_pytorch() {
    assert_eq!(d2l::device_repr(Device::Cpu), "device(type='cpu')");
    assert_eq!(
        d2l::device_repr(Device::Cuda(1)),
        "device(type='cuda', index=1)"
    );
}

#[test]
fn device_list_prints_like_a_python_list() {
    let one = d2l::Devices(vec![Device::Cuda(0)]);
    assert_eq!(one.to_string(), "[device(type='cuda', index=0)]");
    let two = d2l::Devices(vec![Device::Cuda(0), Device::Cuda(1)]);
    assert_eq!(
        format!("{two:?}"),
        "[device(type='cuda', index=0), device(type='cuda', index=1)]"
    );
    assert_eq!(two[1], Device::Cuda(1));
}

#[test]
fn try_gpu_and_try_all_gpus_give_the_gpus_libtorch_sees_or_the_cpu() {
    let n = d2l::num_gpus();
    assert_eq!(n as i64, d2l::tch::Cuda::device_count());
    if n == 0 {
        assert_eq!(d2l::try_gpu(0), Device::Cpu);
        assert_eq!(d2l::try_gpu(3), Device::Cpu);
        assert_eq!(d2l::try_all_gpus().to_string(), "[device(type='cpu')]");
    } else {
        assert_eq!(d2l::try_gpu(0), Device::Cuda(0));
        assert_eq!(d2l::try_gpu(n - 1), Device::Cuda(n - 1));
        let all: Vec<Device> = (0..n).map(Device::Cuda).collect();
        assert_eq!(d2l::try_all_gpus().0, all);
        assert!(d2l::try_all_gpus()
            .to_string()
            .starts_with("[device(type='cuda', index=0)"));
    }
    assert_eq!(d2l::try_gpu(n), Device::Cpu);
}

#[test]
fn gpu_indices_past_the_last_gpu_give_the_cpu() {
    assert_eq!(d2l::try_gpu(d2l::num_gpus()), Device::Cpu);
}

#[test]
fn versions_report_the_pinned_libtorch_and_tch() {
    let v = d2l::versions();
    assert!(v.libtorch.starts_with("2.11.0"), "libtorch {}", v.libtorch);
    assert_eq!(v.tch, "0.24.0");
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(
        manifest.contains(&format!("tch = \"={}\"", v.tch)),
        "Cargo.toml pins another tch"
    );
    let text = v.to_string();
    assert!(text.contains("libtorch 2.11.0"), "{text}");
    assert!(text.ends_with(&format!("devices: {}", v.devices)), "{text}");
}
