//! The deployment pack (`deploy/`) as the tests use it: the command line of
//! a systemd unit's `ExecStart`, with the pack's `/etc/confab/` files taken
//! from the repository, and the variables of its environment files. The
//! multi-host tests start components this way, so the pack cannot drift
//! from what is tested.

use std::path::{Path, PathBuf};

/// Where the pack's files are installed on a host.
pub const ETC: &str = "/etc/confab/";

/// The repository's `deploy/` directory.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The arguments of `unit`'s `ExecStart` after the program, with every
/// `/etc/confab/…` path made the repository's `deploy/etc/confab/…`.
pub fn exec_args(unit: &str) -> Vec<String> {
    let path = dir().join("systemd").join(unit);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{unit} has no ExecStart"));
    let mut words = line.split_whitespace();
    assert_eq!(
        words.next(),
        Some("/usr/local/bin/confab"),
        "{unit}: {line}"
    );
    let etc = dir().join("etc/confab");
    words
        .map(|w| match w.strip_prefix(ETC) {
            Some(file) => etc.join(file).display().to_string(),
            None => w.to_owned(),
        })
        .collect()
}

/// The `NAME=value` lines of one of the pack's environment files
/// (`deploy/etc/confab/<name>`).
pub fn env_file(name: &str) -> Vec<(String, String)> {
    let path = dir().join("etc/confab").join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{name}: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// `base` with `overrides` put over it (same names replaced, new ones added).
pub fn overlay(
    mut base: Vec<(String, String)>,
    overrides: &[(&str, String)],
) -> Vec<(String, String)> {
    for (k, v) in overrides {
        match base.iter_mut().find(|(name, _)| name == k) {
            Some(entry) => entry.1 = v.clone(),
            None => base.push(((*k).to_owned(), v.clone())),
        }
    }
    base
}
