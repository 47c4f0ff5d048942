//! Test hosts on this machine: Linux network namespaces joined by a bridge,
//! for the multi-host tests. Each [`Net`] is a switch (a namespace of its
//! own holding a bridge) and hosts (a namespace each, with a veth pair to
//! the switch and an address in 10.77.0.0/24). Nothing outside the
//! namespaces the test makes is touched or addressed: the root namespace
//! gets no interface and no route, and the addresses live only inside.
//!
//! Faults between two hosts: [`Net::cut`] drops their packets both ways (a
//! blackhole route to the other in each host: this machine's kernel has no
//! `netem` or `prio` qdisc, so links cannot be delayed or made lossy here),
//! [`Net::heal`] removes that; [`Host::crash`] kills a host's processes and
//! takes its link down; [`Host::freeze`] stops its processes. Processes run in a host with
//! [`Host::spawn`] (`ip netns exec`); the test's own client code runs in a
//! host with [`Host::run`] (a thread that enters the namespace and drives a
//! tokio runtime there: every socket it opens belongs to that host).
//!
//! Everything is removed when the `Net` is dropped, also when the test
//! fails: processes are killed, namespaces deleted. Making namespaces needs
//! root (or CAP_NET_ADMIN and CAP_SYS_ADMIN); without it [`Net::new`]
//! fails with the reason, and the test fails with it: it never passes
//! without its hosts.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The test hosts' subnet (inside the test's namespaces only).
pub const SUBNET: &str = "10.77.0";

pub struct Net {
    prefix: String,
    switch: String,
    hosts: Mutex<Vec<Arc<Host>>>,
}

pub struct Host {
    pub name: String,
    /// The namespace's name.
    pub ns: String,
    pub addr: String,
    /// The host's interface (its end of the veth pair).
    dev: String,
    children: Mutex<Vec<Child>>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Run `cmd` in namespace `ns`.
fn in_ns(ns: &str, cmd: &[&str]) -> Result<(), String> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    ip(&args)
}

impl Net {
    /// A switch with no hosts yet; names are unique to this process and
    /// call, so that tests can run side by side.
    pub fn new() -> Result<Net, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "cf{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{prefix}-sw");
        ip(&["netns", "add", &switch]).map_err(|e| {
            format!("cannot make a network namespace (root or CAP_SYS_ADMIN is needed): {e}")
        })?;
        let net = Net {
            prefix,
            switch,
            hosts: Mutex::new(Vec::new()),
        };
        in_ns(&net.switch, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&net.switch, &["ip", "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// A host `name` at `SUBNET.<last>`, its loopback and link up.
    pub fn host(&self, name: &str, last: u8) -> Result<Arc<Host>, String> {
        let n = self.hosts.lock().unwrap_or_else(|e| e.into_inner()).len();
        let ns = format!("{}-{name}", self.prefix);
        // The switch's end lives in the switch's namespace only.
        let (outer, dev) = (format!("v{n}"), "eth0".to_owned());
        ip(&["netns", "add", &ns])?;
        let host = Arc::new(Host {
            name: name.to_owned(),
            ns: ns.clone(),
            addr: format!("{SUBNET}.{last}"),
            dev: dev.clone(),
            children: Mutex::new(Vec::new()),
        });
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(host.clone());
        ip(&[
            "link",
            "add",
            &outer,
            "netns",
            &self.switch,
            "type",
            "veth",
            "peer",
            "name",
            &dev,
            "netns",
            &ns,
        ])?;
        in_ns(
            &self.switch,
            &["ip", "link", "set", &outer, "master", "br0"],
        )?;
        in_ns(&self.switch, &["ip", "link", "set", &outer, "up"])?;
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
        in_ns(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", host.addr),
                "dev",
                &dev,
            ],
        )?;
        in_ns(&ns, &["ip", "link", "set", &dev, "up"])?;
        Ok(host)
    }

    /// Drop every packet between `a` and `b`, both ways.
    pub fn cut(&self, a: &Host, b: &Host) -> Result<(), String> {
        a.drop_to(&b.addr)?;
        b.drop_to(&a.addr)
    }

    /// Undo [`Net::cut`].
    pub fn heal(&self, a: &Host, b: &Host) -> Result<(), String> {
        a.undrop_to(&b.addr)?;
        b.undrop_to(&a.addr)
    }
}

impl Host {
    /// `program args…` in this host (its stdout and stderr to `log`).
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(
        &self,
        program: &std::path::Path,
        args: &[S],
        log: &std::path::Path,
    ) -> Result<u32, String> {
        self.spawn_with_env(program, args, &[], log)
    }

    /// [`Host::spawn`] with environment variables added.
    pub fn spawn_with_env<S: AsRef<std::ffi::OsStr>>(
        &self,
        program: &std::path::Path,
        args: &[S],
        env: &[(String, String)],
        log: &std::path::Path,
    ) -> Result<u32, String> {
        let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {} in {}: {e}", program.display(), self.name))?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    /// The host is gone, as when its machine dies: its link goes down
    /// first (so that no FIN or RST from its dying processes reaches
    /// anyone: their peers find out by timeouts), then every process of it
    /// is killed with SIGKILL.
    pub fn crash(&self) -> Result<(), String> {
        in_ns(&self.ns, &["ip", "link", "set", &self.dev, "down"])?;
        self.kill_all();
        Ok(())
    }

    /// Stop (SIGSTOP) or resume (SIGCONT) every process of this host: a
    /// frozen host keeps its connections open and answers nothing.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        for child in self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // `ip netns exec` runs the program in its own process.
            let _ = confab::process::signal(child.id(), signal);
        }
    }

    fn kill_all(&self) {
        for child in self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Drop `percent` % of the packets this host sends to or receives from
    /// each of `peers`, at random (nftables; the rules go with the host).
    pub fn lossy(&self, peers: &[&str], percent: u8) -> Result<(), String> {
        let set = peers.join(", ");
        let rules = format!(
            "table inet confab_loss {{
  chain out {{ type filter hook output priority 0; ip daddr {{ {set} }} numgen random mod 100 < {percent} counter drop; }}
  chain in {{ type filter hook input priority 0; ip saddr {{ {set} }} numgen random mod 100 < {percent} counter drop; }}
}}"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft (cargo xtask test installs nftables): {e}"))?;
        use std::io::Write;
        child
            .stdin
            .take()
            .ok_or("nft: no stdin")?
            .write_all(rules.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "nft in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Packets [`Host::lossy`] has dropped so far.
    pub fn dropped(&self) -> Result<u64, String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "nft",
                "list",
                "table",
                "inet",
                "confab_loss",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .split("packets ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    fn drop_to(&self, addr: &str) -> Result<(), String> {
        in_ns(
            &self.ns,
            &["ip", "route", "add", "blackhole", &format!("{addr}/32")],
        )
    }

    fn undrop_to(&self, addr: &str) -> Result<(), String> {
        in_ns(
            &self.ns,
            &["ip", "route", "del", "blackhole", &format!("{addr}/32")],
        )
    }

    /// Run `work` with every socket it opens in this host: on a thread of
    /// its own that enters the namespace, on a runtime of that thread.
    pub fn run<F, T>(&self, work: F) -> std::thread::JoinHandle<Result<T, String>>
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a namespace file we hold open; it changes
            // only this thread's network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            Ok(runtime.block_on(work))
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let hosts = std::mem::take(&mut *self.hosts.lock().unwrap_or_else(|e| e.into_inner()));
        for host in &hosts {
            host.kill_all();
            let _ = ip(&["netns", "del", &host.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}
