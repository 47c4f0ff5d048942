//! Builds the dashboard's browser half and embeds it.
//!
//! Runs a nested `cargo rustc` of `confab-dashboard` for
//! `wasm32-unknown-unknown` (feature `hydrate`, profile `wasm-release`) into
//! `target/dashboard-wasm`, then wasm-bindgen's library (the same version
//! as the `wasm-bindgen` crate the dashboard pins) for the JS glue, gzips
//! each file and writes a table of `include_bytes!` for `src/lib.rs`.
//!
//! Why a crate of its own: it is native-only, so the nested WASM build does
//! not compile this script again, and the server depends on it like on any
//! crate. `cargo run --release -- up` and `cargo test` share one WASM build
//! (fixed target directory and profile, whatever the outer profile is).
//! Nothing generated is committed; the WASM target is added with rustup
//! when missing (these machines do not auto-install targets).
//!
//! `CONFAB_SKIP_WASM=1` skips it (an empty table, `BUILT = false`) for a
//! quick `cargo check`; the dashboard then says that it was built without
//! its browser half.

use std::env;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const NAME: &str = "confab_dashboard";
const TARGET: &str = "wasm32-unknown-unknown";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        // A build script's error is shown whole by cargo.
        eprintln!("error: building the dashboard's WASM failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let here = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let dashboard = here.parent().ok_or("no dashboard/")?.to_path_buf();
    let workspace = dashboard.parent().ok_or("no workspace")?.to_path_buf();
    for path in [
        dashboard.join("src"),
        dashboard.join("style"),
        dashboard.join("Cargo.toml"),
        workspace.join("Cargo.toml"),
        workspace.join("Cargo.lock"),
    ] {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    println!("cargo::rerun-if-env-changed=CONFAB_SKIP_WASM");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    if env::var_os("CONFAB_SKIP_WASM").is_some() {
        return write_table(&out, &[], false);
    }
    let target_root = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let wasm_dir = target_root.join("dashboard-wasm");
    ensure_wasm_target()?;
    build_wasm(&workspace, &wasm_dir)?;
    let wasm = wasm_dir
        .join(TARGET)
        .join("wasm-release")
        .join(format!("{NAME}.wasm"));
    let pkg = out.join("pkg");
    let _ = fs::remove_dir_all(&pkg);
    wasm_bindgen_cli_support::Bindgen::new()
        .input_path(&wasm)
        .out_name(NAME)
        .web(true)?
        .typescript(false)
        .remove_name_section(true)
        .remove_producers_section(true)
        .generate(&pkg)?;
    // The stylesheet travels with the glue: one place serves both.
    fs::copy(
        dashboard.join("style").join("dashboard.css"),
        pkg.join("dashboard.css"),
    )?;
    let files = walk(&pkg)?;
    for file in &files {
        gzip(file)?;
    }
    write_table(&out, &files, true)
}

/// `rustup target add` when the toolchain has no WASM standard library.
fn ensure_wasm_target() -> Result<()> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim());
    if sysroot
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
    {
        return Ok(());
    }
    println!("cargo::warning=adding the {TARGET} target with rustup (once)");
    let mut add = Command::new("rustup");
    add.args(["target", "add", TARGET]);
    if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
        add.arg("--toolchain").arg(toolchain);
    }
    let status = add.stdout(Stdio::from(std::io::stderr())).status()?;
    if !status.success() {
        return Err(format!("`rustup target add {TARGET}` failed ({status})").into());
    }
    Ok(())
}

fn build_wasm(workspace: &Path, wasm_dir: &Path) -> Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(workspace)
        .args([
            "rustc",
            "-p",
            "confab-dashboard",
            "--lib",
            "--crate-type",
            "cdylib",
            "--target",
            TARGET,
            "--profile",
            "wasm-release",
            "--no-default-features",
            "--features",
            "hydrate",
        ])
        .arg("--target-dir")
        .arg(wasm_dir)
        .env("CARGO_BUILD_BUILD_DIR", wasm_dir)
        // cargo reads build scripts' stdout for instructions.
        .stdout(Stdio::from(std::io::stderr()));
    // The outer build's settings must not leak into the WASM build: its
    // target directory (cargo would wait on its own lock), host RUSTFLAGS,
    // clippy's wrapper, this script's own variables.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let keep = key == "CARGO_HOME"
            || key == "CARGO_MAKEFLAGS"
            || [
                "CARGO_NET_",
                "CARGO_HTTP_",
                "CARGO_REGISTRIES_",
                "CARGO_TERM_",
            ]
            .iter()
            .any(|p| key.starts_with(p));
        let leaks = (key.starts_with("CARGO_") && !keep)
            || [
                "RUSTFLAGS",
                "RUSTC_WRAPPER",
                "RUSTC_WORKSPACE_WRAPPER",
                "TARGET",
                "HOST",
                "PROFILE",
                "OUT_DIR",
                "OPT_LEVEL",
                "DEBUG",
                "NUM_JOBS",
                "RUSTDOCFLAGS",
            ]
            .contains(&key.as_str());
        if leaks {
            build.env_remove(&key);
        }
    }
    let status = build.status()?;
    if !status.success() {
        return Err(format!("cargo rustc for {TARGET} failed ({status})").into());
    }
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else if path.extension().is_none_or(|e| e != "gz") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn gzip(file: &Path) -> Result<()> {
    let raw = fs::read(file)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&raw)?;
    fs::write(gz_path(file), gz.finish()?)?;
    Ok(())
}

fn gz_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".gz");
    PathBuf::from(name)
}

fn write_table(out: &Path, files: &[PathBuf], built: bool) -> Result<()> {
    let pkg = out.join("pkg");
    let mut table = String::from("pub static ASSETS: &[Asset] = &[\n");
    for file in files {
        let path = file
            .strip_prefix(&pkg)?
            .to_string_lossy()
            .replace('\\', "/");
        table.push_str(&format!(
            "    Asset {{ path: {path:?}, raw: include_bytes!({raw:?}), gzip: include_bytes!({gz:?}) }},\n",
            raw = file.display().to_string(),
            gz = gz_path(file).display().to_string(),
        ));
    }
    table.push_str("];\n");
    table.push_str(&format!("pub static BUILT: bool = {built};\n"));
    fs::write(out.join("assets.rs"), table)?;
    Ok(())
}
