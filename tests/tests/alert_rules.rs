//! The Prometheus alert rules load and pass their promtool unit tests.
//! Needs `promtool` and `amtool` (Debian's `prometheus` and
//! `prometheus-alertmanager` packages; the README's set-up).

use std::path::Path;
use std::process::Command;

/// Run `tool` (from Debian's `package`) in the repository; its output.
fn run(tool: &str, package: &str, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(tool)
        .args(args)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} not runnable ({e}); install Debian's {package} package (README set-up)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

fn promtool(args: &[&str]) -> String {
    run("promtool", "prometheus", args)
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

/// Every alert has a unit-test case where it fires and one where it must
/// stay quiet.
#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let alerts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../alerts");
    let read = |name: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(alerts.join(name)).unwrap()).unwrap()
    };
    let rules = read("confab-rules.yml");
    let names: Vec<String> = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    assert!(names.len() >= 10, "alerts found: {names:?}");
    let (mut firing, mut quiet) = (Vec::new(), Vec::new());
    let tests = read("confab-rules.test.yml");
    for case in tests["tests"].as_sequence().unwrap() {
        for check in case["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = check["alertname"].as_str().unwrap().to_owned();
            let expected = check["exp_alerts"].as_sequence().map_or(0, |a| a.len());
            if expected > 0 {
                firing.push(name);
            } else {
                quiet.push(name);
            }
        }
    }
    for name in &names {
        assert!(firing.contains(name), "{name}: no unit test where it fires");
        // The watchdog fires always, by design: there is no quiet case.
        if name == "ConfabWatchdog" {
            continue;
        }
        assert!(
            quiet.contains(name),
            "{name}: no unit test where it stays quiet"
        );
    }
}

/// The Alertmanager example loads (amtool: Debian's prometheus-alertmanager
/// package, the README's set-up).
#[test]
fn alertmanager_example_is_valid() {
    let text = run(
        "amtool",
        "prometheus-alertmanager",
        &["check-config", "alerts/alertmanager.example.yml"],
    );
    assert!(text.contains("SUCCESS"), "{text}");
}
