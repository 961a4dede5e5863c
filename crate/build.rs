//! Link settings that torch-sys cannot give the final binaries (shared by the root package).
//!
//! - An rpath to libtorch's lib dir: torch-sys passes its `-rpath` to `cc`, not to the final link,
//!   so binaries and test executables would not find `libtorch_cpu.so` without LD_LIBRARY_PATH.
//! - With the full CUDA install, keep `libtorch_cuda.so` linked: rustc links with `--as-needed`,
//!   which drops it, and then `tch::Cuda::is_available()` is false even on a GPU machine.
//! - The libtorch version, for `d2l::versions()`.
//! - For the `d2l` package, the CPU kernels (`src/model/{norm,pool}.cpp`, `src/train/sgd.cpp`:
//!   libtorch's headers only), and the c10d shim behind `d2l::dist` (`src/dist/shim.cpp`), compiled
//!   against libtorch's headers with torch-sys's C++ ABI and gloo's headers (Debian's
//!   `libgloo-dev`, which the torch wheel leaves out). Without those headers the crate builds
//!   without it and `d2l::dist` says what to install.
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
    println!("cargo::rustc-check-cfg=cfg(d2l_dist)");
    if env::var("CARGO_PKG_NAME").is_ok_and(|n| n == "d2l") {
        build_kernels(Path::new(&lib));
        build_dist_shim(Path::new(&lib), cuda);
    }
}

/// The C++ ABI flag torch-sys compiles its own wrapper with.
fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned())
}

/// The CPU kernels (`src/model/{norm,pool}.cpp`, `src/train/sgd.cpp`) against libtorch's headers,
/// optimised in every profile (the tests run the same code as a release build).
fn build_kernels(lib: &Path) {
    let files = [
        "src/model/conv.cpp",
        "src/model/norm.cpp",
        "src/model/pool.cpp",
        "src/model/winograd.cpp",
        "src/train/sgd.cpp",
    ];
    println!("cargo:rerun-if-changed=src/guard.h");
    println!("cargo:rerun-if-changed=src/parallel.h");
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let include = lib.join("..").join("include");
    cc::Build::new()
        .cpp(true)
        .files(files)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        // GCC notes that 32-byte vector arguments changed ABI in GCC 4.6: only inlined helpers
        // of norm.cpp take them.
        .flag("-Wno-psabi")
        .opt_level(3)
        .warnings(false)
        .compile("d2l_kernels");
}

/// Where gloo's headers are: `D2L_GLOO_INCLUDE`, else the system's (`/usr/include/gloo`).
fn gloo_include() -> Option<std::path::PathBuf> {
    println!("cargo:rerun-if-env-changed=D2L_GLOO_INCLUDE");
    let dir = env::var_os("D2L_GLOO_INCLUDE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/include".into());
    let header = dir.join("gloo/algorithm.h");
    println!("cargo:rerun-if-changed={}", header.display());
    header.exists().then_some(dir)
}

fn build_dist_shim(lib: &Path, cuda: bool) {
    let shim = "src/dist/shim.cpp";
    println!("cargo:rerun-if-changed={shim}");
    println!("cargo:rerun-if-changed=src/guard.h");
    let include = lib.join("..").join("include");
    let c10d = include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
    let Some(gloo) = gloo_include() else {
        println!(
            "cargo:warning=d2l::dist (torch.distributed) is off: gloo's headers are missing; \
             install them (apt install libgloo-dev, or python3 scripts/setup.py) and rebuild"
        );
        return;
    };
    if !c10d.exists() {
        println!("cargo:warning=d2l::dist is off: this libtorch has no c10d headers");
        return;
    }
    let abi = cxx11_abi();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file(shim)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(gloo)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .define("USE_DISTRIBUTED", None)
        .define("USE_C10D_GLOO", None)
        .define("GLOG_USE_GLOG_EXPORT", None)
        .warnings(false);
    // NCCL with the CUDA install: ProcessGroupNCCL's header needs NCCL's (the nccl wheel) and
    // CUDA's (the runtime, crt and cccl wheels, all under nvidia/cu13/include).
    let nvidia = lib.join("../../nvidia");
    let (nccl, cuda_inc) = (nvidia.join("nccl/include"), nvidia.join("cu13/include"));
    let have = |p: &Path| {
        println!("cargo:rerun-if-changed={}", p.display());
        p.exists()
    };
    if cuda && lib.join("libtorch_cuda.so").exists() {
        if have(&nccl.join("nccl.h"))
            && have(&cuda_inc.join("cuda_runtime_api.h"))
            && have(&cuda_inc.join("crt/host_config.h"))
            && have(&cuda_inc.join("nv/target"))
        {
            build
                .define("USE_C10D_NCCL", None)
                .define("D2L_WITH_NCCL", None)
                .include(nccl)
                .include(cuda_inc);
        } else {
            println!(
                "cargo:warning=d2l::dist: NCCL is off: the CUDA headers it needs are missing \
                 (python3 scripts/setup.py --torch cuda installs them); Gloo only"
            );
        }
    }
    build.compile("d2l_dist_shim");
    println!("cargo:rustc-cfg=d2l_dist");
}
