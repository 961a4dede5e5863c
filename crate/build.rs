//! Link settings that torch-sys cannot give the final binaries (shared by the root package).
//!
//! - An rpath to libtorch's lib dir: torch-sys passes its `-rpath` to `cc`, not to the final link,
//!   so binaries and test executables would not find `libtorch_cpu.so` without LD_LIBRARY_PATH.
//! - With the full CUDA install, keep `libtorch_cuda.so` linked: rustc links with `--as-needed`,
//!   which drops it, and then `tch::Cuda::is_available()` is false even on a GPU machine.
//! - The libtorch version, for `d2l::versions()`.
use std::env;
use std::fs;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed={}", file!());
    println!("cargo:rerun-if-env-changed=D2L_TORCH_VARIANT");
    // Set by torch-sys (`links = "tch"`) for the packages that depend on it directly.
    let Ok(lib) = env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=D2L_LIBTORCH_LIB={lib}");

    let version_py = Path::new(&lib).join("..").join("version.py");
    println!("cargo:rerun-if-changed={}", version_py.display());
    let version = fs::read_to_string(&version_py)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim().trim_matches(['\'', '"']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=D2L_LIBTORCH_VERSION={version}");

    let cuda = env::var("D2L_TORCH_VARIANT").is_ok_and(|v| v == "cuda");
    if cuda && Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
