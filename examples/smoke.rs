//! `notebooks/smoke.ipynb` outside Jupyter: versions, devices, a tensor, and an image saved to
//! a file (the notebook shows it inline).
//!
//! Run with `cargo run --example smoke [-- OUT.png]` (default `target/figures/smoke.png`).
use d2l::tch::{Kind, Tensor};

fn main() -> d2l::Result<()> {
    println!("{}", d2l::versions());
    let devices = d2l::try_all_gpus();
    println!("{devices}");

    let x = Tensor::arange(12, (Kind::Float, devices[0])).reshape([3, 4]);
    x.print();
    println!("{}", x.sum(Kind::Float).double_value(&[]));

    let img = d2l::gradient_image(64, 256, devices[0]); // [3, 64, 256]
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/figures/smoke.png".into());
    d2l::Png::from_tensor(&img)?.save(&out)?;
    println!("saved {out}");
    Ok(())
}
