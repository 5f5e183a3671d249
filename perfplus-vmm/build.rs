//! Builds the built-in workload guest (`../guest`, a `no_std` multiboot kernel for
//! `x86_64-unknown-none`) and leaves its ELF at `$OUT_DIR/perfplus-guest.elf`, where
//! `src/vm/builtin_guest.rs` embeds it with `include_bytes!`.
//!
//! The guest is built by a nested `cargo build` with its own target and target directory. Everything
//! the outer build passes through the environment to build scripts (RUSTFLAGS, CARGO_* build and
//! profile settings, clippy's rustc wrapper, ...) is removed first: those are meant for the host
//! crates and would break or silently change the guest (`cargo clippy` / `cargo test` of the host
//! workspace must still produce the normal guest).

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-none";
const GUEST_BIN: &str = "perfplus-guest";

/// Variables the nested cargo must not inherit (besides every `CARGO_*` except `CARGO_HOME`).
const REMOVED_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_LINKER",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "OPT_LEVEL",
    "PROFILE",
    "DEBUG",
    "NUM_JOBS",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("perfplus-vmm lives inside the workspace")
        .to_path_buf();
    let guest_dir = root.join("guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("guest-target");

    for p in [
        "guest/src",
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "guest/build.rs",
        "guest/link.ld",
        "guest/.cargo/config.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--target", GUEST_TARGET, "--target-dir"])
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        let cargo_var = (k.starts_with("CARGO_") && k != "CARGO_HOME") || k.starts_with("__CARGO");
        if cargo_var || REMOVED_VARS.contains(&k) {
            cmd.env_remove(&key);
        }
    }

    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) => fail(
            &guest_dir,
            &format!("could not run {}: {e}", Path::new(&cargo).display()),
            "",
        ),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        fail(
            &guest_dir,
            &format!("`cargo build` of the guest failed ({})", output.status),
            &stderr,
        );
    }
    for line in stderr.lines().filter(|l| l.starts_with("warning")) {
        println!("cargo:warning=guest: {line}");
    }

    let elf = target_dir.join(GUEST_TARGET).join("release").join(GUEST_BIN);
    let dest = out_dir.join("perfplus-guest.elf");
    if let Err(e) = std::fs::copy(&elf, &dest) {
        fail(
            &guest_dir,
            &format!("could not copy {} to {}: {e}", elf.display(), dest.display()),
            &stderr,
        );
    }
}

fn fail(guest_dir: &Path, what: &str, stderr: &str) -> ! {
    let mut hint = String::from(
        "the built-in guest needs the x86_64-unknown-none target: run `rustup target add x86_64-unknown-none` \
         (and `rustup component add rust-src`)",
    );
    if stderr.contains("can't find crate for `core`") || stderr.contains("target may not be installed") {
        hint = format!("likely fix: {hint}");
    } else {
        hint = format!("if the error mentions a missing target or `core`: {hint}; try `cargo build --release` in {} to see the error on its own", guest_dir.display());
    }
    panic!(
        "building the perfplus guest ({}): {what}\n{hint}\n--- cargo output ---\n{stderr}",
        guest_dir.display()
    );
}
