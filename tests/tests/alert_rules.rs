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
    let files = ["confab-rules.test.yml", "confab-slo.test.yml"];
    let tests: Vec<serde_yaml::Value> = files.iter().map(|f| read(f)).collect();
    for case in tests
        .iter()
        .flat_map(|t| t["tests"].as_sequence().unwrap().iter())
    {
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

/// Every alert's `runbook_url` points at its own section of
/// `alerts/README.md`, and that section says what the rule says (its
/// severities, summary and runbook steps, with `<label>` for the label
/// templates). The section is generated from the rules: run with
/// `CONFAB_BLESS=1` to rewrite it after changing a rule.
#[test]
fn the_runbooks_in_the_readme_match_the_rules() {
    let alerts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../alerts");
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(alerts.join("confab-rules.yml")).unwrap())
            .unwrap();
    // alert name -> [(severity, summary, runbook, dashboard_url)], in file order.
    let mut sections: Vec<(String, Vec<[String; 4]>)> = Vec::new();
    for rule in rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
    {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        let a = &rule["annotations"];
        let text = |k: &str| a[k].as_str().unwrap_or_else(|| panic!("{name}: no {k}"));
        let anchor = name.to_lowercase();
        assert_eq!(
            text("runbook_url"),
            format!("{{{{ $externalLabels.confab_runbook_url }}}}#{anchor}"),
            "{name}: runbook_url"
        );
        let dashboard = text("dashboard_url");
        let uid = dashboard
            .strip_prefix("{{ $externalLabels.confab_grafana_url }}/d/")
            .unwrap_or_else(|| panic!("{name}: dashboard_url {dashboard}"));
        assert!(
            alerts
                .join(format!("../grafana/dashboards/{uid}.json"))
                .is_file(),
            "{name}: dashboard_url names no dashboard: {uid}"
        );
        let severity = rule["labels"]["severity"].as_str().unwrap().to_owned();
        assert!(
            ["critical", "warning", "info", "none"].contains(&severity.as_str()),
            "{name}: severity {severity}"
        );
        let entry = [
            severity,
            placeholders(text("summary")),
            placeholders(text("runbook")),
            uid.to_owned(),
        ];
        match sections.iter_mut().find(|(n, _)| n == name) {
            Some((_, tiers)) => tiers.push(entry),
            None => sections.push((name.to_owned(), vec![entry])),
        }
    }
    let mut want = String::from(BEGIN);
    want.push('\n');
    for (name, tiers) in &sections {
        let severities: Vec<&str> = tiers.iter().map(|t| t[0].as_str()).collect();
        want.push_str(&format!(
            "\n### {name}\n\nSeverity: {}. Dashboard: `{}`.\n\n",
            severities.join(", "),
            tiers[0][3]
        ));
        for t in tiers {
            want.push_str(&format!("> {}\n\n", t[1]));
        }
        // The tiers of one alert share their runbook.
        want.push_str(tiers[0][2].trim_end());
        want.push('\n');
    }
    want.push('\n');
    want.push_str(END);
    let path = alerts.join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (start, end) = (
        readme
            .find(BEGIN)
            .expect("alerts/README.md: no runbooks marker"),
        readme
            .find(END)
            .expect("alerts/README.md: no runbooks end marker")
            + END.len(),
    );
    if readme[start..end] != want {
        if std::env::var_os("CONFAB_BLESS").is_some() {
            std::fs::write(
                &path,
                format!("{}{want}{}", &readme[..start], &readme[end..]),
            )
            .unwrap();
        } else {
            panic!(
                "alerts/README.md's runbooks differ from confab-rules.yml; \
                 rerun with CONFAB_BLESS=1 to regenerate them. Expected:\n{want}"
            );
        }
    }
}

const BEGIN: &str =
    "<!-- runbooks: generated from confab-rules.yml by tests/tests/alert_rules.rs -->";
const END: &str = "<!-- end of runbooks -->";

/// `{{ $labels.instance }}` -> `<instance>`, `{{ $value ... }}` -> `<value>`.
fn placeholders(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let close = rest[open..].find("}}").expect("unclosed template") + open;
        let inner = rest[open + 2..close].trim();
        let name = inner
            .strip_prefix("$labels.")
            .map(str::to_owned)
            .unwrap_or_else(|| "value".to_owned());
        out.push_str(&format!("<{name}>"));
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    out
}
