//! The deployment pack (`deploy/`): its systemd units pass
//! `systemd-analyze verify`, and its example configurations, with the
//! secrets files they name, pass `confab config check`. (The multi-host
//! tests start their instances and a gateway with the pack's command lines
//! and files: `tests/multihost.rs`.)

use confab_e2e::{confab_bin, deploy};
use std::process::Command;

const UNITS: [&str; 3] = [
    "confab-instance.service",
    "confab-gateway.service",
    "confab-dashboard.service",
];

/// `systemd-analyze verify` in a root of the test's own: the system's unit
/// directory (for the targets the units name), the pack's units, and an
/// executable where the units expect the binary (verify checks that it is
/// there, not what it does). Any warning fails the test.
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    let copied = Command::new("cp")
        .args(["-r", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .expect("cp");
    assert!(
        copied.success(),
        "copying the system's units (is systemd installed?)"
    );
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    for unit in UNITS {
        std::fs::copy(
            deploy::dir().join("systemd").join(unit),
            r.join("etc/systemd/system").join(unit),
        )
        .unwrap();
    }
    std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
    let bin = r.join("usr/local/bin/confab");
    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .args(UNITS)
        .output()
        .expect("systemd-analyze (cargo xtask test installs the systemd package)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{said}"
    );
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warned:\n{said}"
    );
}

/// Each example configuration resolves, with its environment file, once
/// the secrets files it names exist (here in a directory of the test's
/// own, named through the environment as an operator could).
#[test]
fn the_example_configurations_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{name}-value")).unwrap();
        path.display().to_string()
    };
    let secrets = [
        ("CONFAB_CLUSTER_SECRET_FILE", file("cluster-secret")),
        ("CONFAB_SERVER_ADMIN_TOKEN_FILE", file("admin-token")),
        ("CONFAB_GATEWAY_TOKEN_SECRET_FILE", file("token-secret")),
        ("CONFAB_GATEWAY_AGENTS_FILE", file("agents")),
        ("CONFAB_DASHBOARD_ADMIN_TOKEN_FILE", file("admin-token")),
        (
            "CONFAB_DASHBOARD_AGENT_CREDENTIAL_FILE",
            file("dashboard-agent-credential"),
        ),
    ];
    for (unit, env_file) in [
        ("confab-instance.service", Some("instance.env")),
        ("confab-gateway.service", Some("gateway.env")),
        ("confab-dashboard.service", None),
    ] {
        let args = deploy::exec_args(unit);
        // `confab [--log-format json] <component> --config FILE`: check
        // that file.
        let config = args
            .iter()
            .position(|a| a == "--config")
            .map(|i| args[i + 1].clone())
            .unwrap_or_else(|| panic!("{unit}: no --config in {args:?}"));
        let env = env_file.map(deploy::env_file).unwrap_or_default();
        let out = Command::new(confab_bin())
            .args(["config", "check", "--config", &config])
            .envs(env)
            .envs(secrets.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{unit}: {config}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
