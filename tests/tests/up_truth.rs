//! `confab up` tells the truth at start-up and at exit: an invalid option,
//! a component that fails, a busy port or a data directory in use stop it
//! with the reason and a non-zero exit, before a banner is printed; Ctrl-C
//! leaves a correct `cluster.json` and no error line. Real `confab up`
//! processes on free loopback ports.

use confab_e2e::cluster::UpPorts;
use confab_e2e::{data_dir, Http};
use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn spawn_up(ports: &UpPorts, dir: &Path, out: &Path, extra: &[&str]) -> Child {
    let stdout = std::fs::File::create(out.join("up.stdout")).unwrap();
    let stderr = std::fs::File::create(out.join("up.stderr")).unwrap();
    ports
        .command(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("starting confab up")
}

/// Wait for `child` to exit (killing it and failing after `limit`).
fn wait_end(mut child: Child, out: &Path, limit: Duration) -> Ended {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Ended {
                code: status.code(),
                stdout: std::fs::read_to_string(out.join("up.stdout")).unwrap_or_default(),
                stderr: std::fs::read_to_string(out.join("up.stderr")).unwrap_or_default(),
                took: started.elapsed(),
            };
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "confab up still running after {limit:?}:\n{}\n{}",
                std::fs::read_to_string(out.join("up.stdout")).unwrap_or_default(),
                std::fs::read_to_string(out.join("up.stderr")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `confab up` to its end; it must end within `limit`.
fn up_to_end(ports: &UpPorts, extra: &[&str], limit: Duration) -> (tempfile::TempDir, Ended) {
    let dir = data_dir();
    let out = data_dir();
    let child = spawn_up(ports, dir.path(), out.path(), extra);
    let ended = wait_end(child, out.path(), limit);
    (dir, ended)
}

fn serving(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn an_invalid_option_stops_up_before_anything_starts() {
    let ports = UpPorts::free(2);
    let (dir, ended) = up_to_end(
        &ports,
        &["--set", "settings.transcript-auto-save=7"],
        Duration::from_secs(10),
    );
    assert_ne!(ended.code, Some(0), "{}", ended.stderr);
    assert!(
        ended.stderr.contains("`settings.transcript-auto-save`")
            && ended.stderr.contains("expected one of \"0\", \"1\", \"2\""),
        "the message names the option and its choices: {}",
        ended.stderr
    );
    assert_eq!(
        ended.stderr.matches("transcript-auto-save").count(),
        1,
        "printed once: {}",
        ended.stderr
    );
    assert!(!ended.stdout.contains("cluster is up"), "{}", ended.stdout);
    assert!(
        !ended.stderr.contains('\u{1b}'),
        "no colours into a file: {:?}",
        ended.stderr
    );
    assert!(
        !dir.path().join("logs/inst-1.log").exists(),
        "nothing was started"
    );
    assert!(ended.took < Duration::from_secs(5), "took {:?}", ended.took);
}

#[test]
fn a_component_that_fails_at_start_up_stops_up_with_its_own_message() {
    let ports = UpPorts::free(2);
    let (_dir, ended) = up_to_end(
        &ports,
        &[
            "--set",
            "server.contact-store-path=/proc/no-such-dir/contacts.db",
        ],
        Duration::from_secs(30),
    );
    assert_ne!(ended.code, Some(0), "{}", ended.stderr);
    assert!(
        ended.stderr.contains("exited during start-up")
            && ended
                .stderr
                .contains("opening the contact store /proc/no-such-dir/contacts.db"),
        "up shows the component's own error: {}",
        ended.stderr
    );
    assert!(!ended.stdout.contains("cluster is up"), "{}", ended.stdout);
    assert!(!serving(ports.gateway), "the gateway was stopped again");
    assert!(!serving(ports.supervisor), "no supervisor API left behind");
}

#[test]
fn a_busy_port_is_refused_before_anything_starts() {
    let ports = UpPorts::free(2);
    let _taken = TcpListener::bind(("127.0.0.1", ports.gateway)).expect("hold the gateway port");
    let (dir, ended) = up_to_end(&ports, &[], Duration::from_secs(10));
    assert_ne!(ended.code, Some(0), "{}", ended.stderr);
    assert!(
        ended
            .stderr
            .contains(&format!("port {} (for gateway) is not free", ports.gateway)),
        "{}",
        ended.stderr
    );
    assert!(!serving(ports.instance_base), "no instance was started");
    assert!(!dir.path().join("logs/inst-1.log").exists());
}

#[tokio::test]
async fn one_up_per_data_directory_start_and_stop_and_a_clean_ctrl_c() {
    let ports = UpPorts::free(2);
    let dir = data_dir();
    let out = data_dir();
    let first = spawn_up(&ports, dir.path(), out.path(), &[]);
    let http = Http::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(out.path().join("up.stdout"))
        .unwrap_or_default()
        .contains("Ctrl-C stops everything")
    {
        assert!(Instant::now() < deadline, "confab up did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cluster: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cluster.json")).unwrap())
            .unwrap();
    let token = cluster["admin_token"].as_str().unwrap().to_owned();
    for file in [
        "cluster.json",
        "token-secret",
        "confab.db",
        "logs/inst-1.log",
        "run/gateway.toml",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is private: {mode:o}");
    }

    // A second cluster on the same data directory (other ports) is refused.
    let other = UpPorts::free(2);
    let second_out = data_dir();
    let second = spawn_up(&other, dir.path(), second_out.path(), &[]);
    let ended = wait_end(second, second_out.path(), Duration::from_secs(10));
    assert_ne!(ended.code, Some(0));
    assert!(
        ended.stderr.contains("is in use by another `confab up`"),
        "{}",
        ended.stderr
    );
    assert!(!serving(other.gateway) && !serving(other.instance_base));

    // stop, start (and start again: already running), through the API.
    let sup = format!("http://127.0.0.1:{}", ports.supervisor);
    let act = |action: &str| {
        let url = format!("{sup}/instances/inst-2/{action}");
        let http = &http;
        let token = token.clone();
        async move { http.post(&url, &json!({}), Some(&token)).await }
    };
    let stopped = act("stop").await.ok();
    assert_eq!(
        stopped["exited"], true,
        "stop answers once it exited: {stopped}"
    );
    let old_pid = stopped["pid"].as_u64().unwrap();
    assert!(!serving(ports.instance_base + 1));
    let started = act("start").await.ok();
    let new_pid = started["pid"].as_u64().unwrap();
    assert_ne!(new_pid, old_pid);
    let status = http
        .get(
            &format!("http://127.0.0.1:{}/status", ports.instance_base + 1),
            None,
        )
        .await
        .ok();
    assert_eq!(
        status["pid"].as_u64(),
        Some(new_pid),
        "start answers once it serves"
    );
    let again = act("start").await;
    assert_eq!((again.status, again.error_code()), (409, "already_running"));

    // Ctrl-C: everything stops, exit 0, no warning or error, and
    // cluster.json tells the last pids, none running.
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(first.id() as i32, libc::SIGINT);
    }
    let ended = wait_end(first, out.path(), Duration::from_secs(30));
    assert_eq!(ended.code, Some(0), "{}\n{}", ended.stdout, ended.stderr);
    let all = format!("{}{}", ended.stdout, ended.stderr);
    for bad in [
        "WARN",
        "ERROR",
        "error",
        "could not write",
        "unix_wait_status",
    ] {
        assert!(
            !all.contains(bad),
            "{bad:?} in the output of a clean stop:\n{all}"
        );
    }
    let cluster: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cluster.json")).unwrap())
            .unwrap();
    let instances = cluster["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    assert!(instances.iter().all(|i| i["running"] == false), "{cluster}");
    assert_eq!(instances[1]["pid"].as_u64(), Some(new_pid), "{cluster}");
    assert!(!serving(ports.gateway) && !serving(ports.instance_base));
}
