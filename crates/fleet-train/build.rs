//! Builds the c10d shim (`csrc/c10d_shim.cpp`) for the trainer.
//!
//! The controller (`crates/fleet`) needs none of this and builds on any laptop. Here torch-sys
//! finds libtorch (`LIBTORCH_USE_PYTORCH=1` and the torch venv's python first on PATH, which
//! `scripts/env.sh` exports) and hands its lib directory to us as `DEP_TCH_LIBTORCH_LIB`. The shim
//! compiles against the headers of that same wheel, so the C++ ABI always matches.
//!
//! ProcessGroupNCCL is compiled in when the wheel is a CUDA build and the CUDA runtime and NCCL
//! headers are next to it (`scripts/setup.sh` installs the header-only pip packages);
//! `FLEET_NCCL=0` leaves it out, `FLEET_NCCL=1` makes its absence an error.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(message) = build_shim() {
        // A build script reports through its exit status; the message is what the user reads.
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn build_shim() -> Result<(), String> {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=FLEET_NCCL");
    println!("cargo:rerun-if-env-changed=FLEET_EXTRA_RPATH");

    let lib = PathBuf::from(env::var("DEP_TCH_LIBTORCH_LIB").map_err(|_| {
        "DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report where libtorch is \
         (run `source scripts/env.sh` first)"
            .to_string()
    })?);
    let include = lib
        .parent()
        .map(|torch| torch.join("include"))
        .unwrap_or_default();
    if !include
        .join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
        .exists()
    {
        return Err(format!(
            "{} has no c10d headers: fleet-train needs a torch wheel (torch==2.11.0)",
            include.display()
        ));
    }

    let nccl = nccl_headers(&lib)?;
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include("csrc/gloo_declarations")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-interference-size")
        .file("csrc/c10d_shim.cpp");
    if let Some(dirs) = &nccl {
        for dir in dirs {
            build.include(dir);
        }
        build
            .define("USE_C10D_NCCL", None)
            .define("FLEET_WITH_NCCL", None);
    }
    build.compile("c10d_shim");

    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    // The shim's symbol test (tests/it/train_shim.rs) inspects these two files.
    println!(
        "cargo:rustc-env=FLEET_SHIM_ARCHIVE={}",
        out.join("libc10d_shim.a").display()
    );
    println!("cargo:rustc-env=FLEET_TORCH_LIB={}", lib.display());
    println!(
        "cargo:rustc-env=FLEET_LIBTORCH_VERSION={}",
        torch_version(&lib)
    );

    println!("cargo:rustc-link-search=native={}", lib.display());
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // tch sets no run path: without one the binary finds libtorch only through LD_LIBRARY_PATH.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if let Ok(extra) = env::var("FLEET_EXTRA_RPATH") {
        for dir in extra.split(':').filter(|d| !d.is_empty()) {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
    // Nothing references libtorch_cuda by symbol, so --as-needed would drop it and CUDA tensors
    // would fail with "Could not run 'aten::empty.memory_format' ... 'CUDA' backend".
    if lib.join("libtorch_cuda.so").exists() {
        println!(
            "cargo:rustc-link-arg-bin=fleet-train=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state"
        );
    }
    Ok(())
}

/// The wheel's version (`torch/version.py`), for `fleet-train --version`.
fn torch_version(lib: &Path) -> String {
    let file = lib
        .parent()
        .map(|torch| torch.join("version.py"))
        .unwrap_or_default();
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("__version__ = "))
                .map(|v| {
                    v.trim_matches(|c| c == '\'' || c == '"' || c == ' ')
                        .to_string()
                })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Include directories for ProcessGroupNCCL, or None when it is to be left out.
fn nccl_headers(lib: &Path) -> Result<Option<Vec<PathBuf>>, String> {
    let wanted = env::var("FLEET_NCCL").ok();
    if wanted.as_deref() == Some("0") {
        return Ok(None);
    }
    let required = wanted.as_deref() == Some("1");
    let site_packages = lib.parent().and_then(Path::parent).unwrap_or(lib);
    let cuda = site_packages.join("nvidia/cu13/include");
    let nccl = site_packages.join("nvidia/nccl/include");
    let needed = [
        lib.join("libtorch_cuda.so"),
        cuda.join("cuda_runtime_api.h"),
        cuda.join("crt/host_defines.h"),
        nccl.join("nccl.h"),
    ];
    match needed.iter().find(|path| !path.exists()) {
        None => Ok(Some(vec![cuda, nccl])),
        Some(missing) if required => Err(format!(
            "FLEET_NCCL=1 but {} is missing (a CUDA torch wheel and \
             `pip install nvidia-cuda-crt nvidia-cuda-cccl` are needed; scripts/setup.sh does it)",
            missing.display()
        )),
        Some(missing) => {
            if lib.join("libtorch_cuda.so").exists() {
                println!(
                    "cargo:warning=fleet-train is built without NCCL: {} is missing",
                    missing.display()
                );
            }
            Ok(None)
        }
    }
}
