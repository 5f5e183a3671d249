//! Builds the eBPF programs (`../perfplus-ebpf`, for `bpfel-unknown-none`) with aya-build and leaves
//! the object at `$OUT_DIR/perfplus-ebpf`, where `src/ebpf.rs` embeds it with
//! `include_bytes_aligned!`. (The built-in guest is built by `perfplus-vmm`'s build script.)

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("perfplus-user lives inside the workspace");
    build_ebpf(root);
}

/// Builds `perfplus-ebpf` for the BPF target with aya-build (after the guest: the variables set here
/// are for that build only).
///
/// aya-build runs `rustup run <toolchain> cargo build -Z build-std=core --target bpfel-unknown-none`.
/// The project uses the machine's `stable` toolchain (a fresh machine has no nightly), which accepts
/// `-Z build-std` when `RUSTC_BOOTSTRAP=1`; it needs `rust-src` and `bpf-linker` (scripts/setup.sh).
fn build_ebpf(root: &Path) {
    let ebpf_dir = root.join("perfplus-ebpf");
    for p in ["perfplus-ebpf/src", "perfplus-ebpf/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    // The nested cargo inherits this process's environment; clippy's wrapper and host RUSTFLAGS are
    // for the host crates (aya-build sets the BPF flags itself through CARGO_ENCODED_RUSTFLAGS).
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        // Only this (single-threaded) build script reads its environment.
        env::remove_var(var);
    }
    env::set_var("RUSTC_BOOTSTRAP", "1");
    let ebpf_dir_text = ebpf_dir.to_str().expect("the workspace path is UTF-8");
    let package = aya_build::Package {
        name: "perfplus-ebpf",
        root_dir: ebpf_dir_text,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom("stable")) {
        panic!(
            "building the eBPF programs ({}): {e:#}\n\
             they need the stable toolchain's rust-src, bpf-linker 0.13.0 built against LLVM 22 and \
             RUSTC_BOOTSTRAP=1 (set here): run scripts/setup.sh",
            ebpf_dir.display()
        );
    }
}
