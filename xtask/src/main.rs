//! `cargo xtask`: the project's development tasks, in Rust so that a fresh
//! machine with only the Rust toolchain can run them (the `xtask` pattern).
//!
//! - `cargo xtask test [ARGS…]`: installs the system tools the tests use when
//!   they are missing (Debian packages, through apt-get), then runs
//!   `cargo test --workspace [ARGS…]`. This is the README's test command.
//! - `cargo xtask deps`: only the installation step.
//!
//! The tools are real parts of the tests, not optional extras: `promtool`
//! checks and unit-tests the alert rules, a real `prometheus` server
//! evaluates them, `amtool` checks the Alertmanager example.

use std::process::{Command, ExitCode};

/// A tool the tests run, and the Debian package that provides it.
struct Tool {
    command: &'static str,
    package: &'static str,
    why: &'static str,
}

const TOOLS: &[Tool] = &[
    Tool {
        command: "promtool",
        package: "prometheus",
        why: "alert rules: promtool check/test rules, check metrics",
    },
    Tool {
        command: "prometheus",
        package: "prometheus",
        why: "a real Prometheus evaluates the alert rules",
    },
    Tool {
        command: "amtool",
        package: "prometheus-alertmanager",
        why: "checks the Alertmanager example",
    },
    Tool {
        command: "chromium",
        package: "chromium",
        why: "the dashboard is tested in a real browser",
    },
    Tool {
        command: "chromedriver",
        package: "chromium-driver",
        why: "drives that browser (WebDriver)",
    },
    Tool {
        command: "ip",
        package: "iproute2",
        why: "the multi-host tests make their hosts as network namespaces",
    },
    Tool {
        command: "nft",
        package: "nftables",
        why: "the multi-host tests drop packets at random on a lossy link",
    },
    Tool {
        command: "systemd-analyze",
        package: "systemd",
        why: "verifies the systemd units of the deployment pack",
    },
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => install_missing().and_then(|()| cargo_test(&args[1..])),
        Some("deps") => install_missing(),
        _ => {
            eprintln!(
                "usage: cargo xtask test [ARGS…]   install missing test tools, then cargo test --workspace [ARGS…]\n       \
                 cargo xtask deps              install missing test tools only"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

/// Installs the packages of every missing tool, with apt-get (as root, or
/// through `sudo -n` when the user is not root).
fn install_missing() -> Result<(), String> {
    let missing: Vec<&Tool> = TOOLS.iter().filter(|t| !on_path(t.command)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.dedup();
    for t in &missing {
        eprintln!(
            "xtask: {} not found ({}): installing {}",
            t.command, t.why, t.package
        );
    }
    if !on_path("apt-get") {
        return Err(format!(
            "apt-get not found; install these packages by hand: {}",
            packages.join(" ")
        ));
    }
    let as_root = is_root();
    let apt = |apt_args: &[&str]| -> Result<(), String> {
        let mut cmd = if as_root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        cmd.args(apt_args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&packages);
    apt(&install)?;
    match TOOLS.iter().find(|t| !on_path(t.command)) {
        Some(t) => Err(format!(
            "{} is still missing after installing {}",
            t.command, t.package
        )),
        None => Ok(()),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// `cargo test --workspace`, with the `confab` binary the end-to-end tests
/// run built first and copied aside (`CONFAB_E2E_BIN`): every test binary
/// runs that one build, and none of them runs cargo itself.
fn cargo_test(extra: &[String]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = extra.iter().any(|a| a == "--release");
    let mut build = Command::new(&cargo);
    build.args(["build", "-p", "confab-server", "--bin", "confab"]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    // `cargo run` sets CARGO_MANIFEST_DIR for the process too; a binary
    // reused from another checkout's build would carry that one's path.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let root = manifest_dir
        .parent()
        .ok_or("no workspace root")?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let built = target
        .join(if release { "release" } else { "debug" })
        .join("confab");
    let under_test = target.join("e2e").join("confab");
    std::fs::create_dir_all(target.join("e2e")).map_err(|e| e.to_string())?;
    std::fs::copy(&built, &under_test).map_err(|e| {
        format!(
            "copying {} to {}: {e}",
            built.display(),
            under_test.display()
        )
    })?;
    run(Command::new(cargo)
        .args(["test", "--workspace"])
        .args(extra)
        .env("CONFAB_E2E_BIN", &under_test))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}
