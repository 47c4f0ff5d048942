//! The Prometheus alert rules load and pass their promtool unit tests.
//! Needs `promtool` (Debian's `prometheus` package; the README's set-up).

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not runnable ({e}); install Debian's prometheus package (README set-up)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "alerts/confab-rules.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rule_unit_tests_pass() {
    let tests: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../alerts"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("test") && n.ends_with(".yml"))
            .map(|n| format!("alerts/{n}"))
            .collect();
    assert!(!tests.is_empty(), "no promtool test files in alerts/");
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    promtool(&args);
}
