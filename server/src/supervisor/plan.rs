//! What `confab up` starts: the cluster's components with their ports,
//! URLs, logs and typed configurations, decided and checked before any
//! process starts. Each confab component gets its own configuration file
//! (`<data-dir>/run/<id>.toml`, written from the same typed [`Config`] the
//! components parse, holding only the sections it uses), so nothing is
//! re-spelled as command-line strings.

use super::data_dir;
use crate::cli::ConfigArgs;
use crate::config::{Config, Section, StoreBackend};
use crate::telemetry::LogFormat;
use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Number of chat server instances.
    #[arg(long, default_value_t = 3)]
    pub instances: u16,
    /// Where the SQLite store, logs, secrets and cluster.json go.
    #[arg(long, default_value = ".confab")]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 8080)]
    pub gateway_port: u16,
    #[arg(long, default_value_t = 8090)]
    pub dashboard_port: u16,
    /// Instance i listens on instance-base-port + i - 1.
    #[arg(long, default_value_t = 7001)]
    pub instance_base_port: u16,
    /// The supervisor API (kill, restart) for tests and the dashboard.
    #[arg(long, default_value_t = 8070)]
    pub supervisor_port: u16,
    /// Session store: sqlite or cassandra (server.store).
    #[arg(long)]
    pub store: Option<String>,
    /// Cassandra contact points HOST:PORT,… (cassandra.contact-points).
    #[arg(long, value_delimiter = ',')]
    pub cassandra_contact_points: Vec<String>,
    /// Admin token (default: a new random one, shown in the banner).
    #[arg(long, env = "CONFAB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Agent credential for the agent page (default: random).
    #[arg(long, env = "CONFAB_AGENT_CREDENTIAL", hide_env_values = true)]
    pub agent_credential: Option<String>,
    /// Also start a real Prometheus (the `prometheus` binary, if installed)
    /// scraping every component with confab's alert rules.
    #[arg(long)]
    pub with_prometheus: bool,
    #[arg(long, default_value_t = 9090)]
    pub prometheus_port: u16,
    /// Log format of the components' log files.
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    pub component_log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Instance,
    Gateway,
    Dashboard,
    Prometheus,
}

/// How a component is started.
#[derive(Debug, Clone)]
pub enum Program {
    /// This `confab` binary: `confab --log-format F <subcommand> --config FILE`.
    Confab {
        subcommand: &'static str,
        config_file: PathBuf,
    },
    /// Another program (Prometheus) with its own arguments.
    External { path: PathBuf, args: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct ComponentSpec {
    pub id: String,
    pub kind: Kind,
    pub port: u16,
    pub url: String,
    pub program: Program,
    pub log: PathBuf,
}

/// Everything `confab up` decided before starting anything.
pub struct Plan {
    pub data_dir: PathBuf,
    pub config: Config,
    pub log_format: LogFormat,
    pub admin_token: String,
    pub agent_credential: String,
    pub token_secret_file: PathBuf,
    pub cluster_secret_file: PathBuf,
    pub gateway_url: String,
    pub dashboard_url: String,
    pub supervisor_addr: SocketAddr,
    pub components: Vec<ComponentSpec>,
}

const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

/// A component's base URL: `https://` when the cluster's listeners speak
/// TLS (`http.tls-cert-file`).
fn url(scheme: &str, port: u16) -> String {
    format!("{scheme}://127.0.0.1:{port}")
}

fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Plan {
    /// Resolve the configuration (the file, the environment, `--set` and
    /// the flags: an invalid option stops here, before anything starts) and
    /// lay out the components in `data_dir` (already created and locked).
    pub fn new(args: UpArgs, data_dir: PathBuf) -> anyhow::Result<Plan> {
        if args.instances == 0 {
            anyhow::bail!("--instances must be at least 1");
        }
        let last = u32::from(args.instance_base_port) + u32::from(args.instances) - 1;
        if last > u32::from(u16::MAX) {
            anyhow::bail!(
                "--instance-base-port {} leaves no room for {} instances",
                args.instance_base_port,
                args.instances
            );
        }
        let contact_points = (!args.cassandra_contact_points.is_empty())
            .then(|| args.cassandra_contact_points.join(","));
        let mut config = args.config.load(&[
            ("server.store", args.store.clone()),
            ("cassandra.contact-points", contact_points),
        ])?;
        let logs = data_dir.join("logs");
        data_dir::private_dir(&logs)?;
        data_dir::private_dir(&data_dir.join("run"))?;
        let admin_token = args.admin_token.clone().unwrap_or_else(random_token);
        let agent_credential = args.agent_credential.clone().unwrap_or_else(random_token);
        // The gateways' token secret, kept across runs so that tokens stay
        // valid after a restart, and so that a second gateway started by
        // hand (`--set gateway.token-secret-file=…`) serves the same chats.
        let token_secret_file = data_dir.join("token-secret");
        let token_secret = kept_secret(&token_secret_file)?;
        // The secret of the instances' internal API, shared by everything
        // of this cluster (a gateway or dashboard started by hand takes
        // `--set cluster.secret-file=…`) unless the configuration gives one.
        let cluster_secret_file = data_dir.join("cluster-secret");
        match &config.cluster.secret {
            Some(given) => data_dir::write_private(&cluster_secret_file, given)?,
            None => config.cluster.secret = Some(kept_secret(&cluster_secret_file)?),
        }
        let layout = Layout {
            data_dir: &data_dir,
            logs: &logs,
            run: data_dir.join("run"),
            scheme: config.http.scheme(),
        };
        let mut components: Vec<ComponentSpec> = (1..=args.instances)
            .map(|i| layout.instance(i, args.instance_base_port + i - 1, &config, &admin_token))
            .collect::<anyhow::Result<_>>()?;
        let mut gateway = config.clone();
        gateway.gateway.listen = SocketAddr::from((LOOPBACK, args.gateway_port));
        gateway.gateway.instances = components.iter().map(|c| c.url.clone()).collect();
        gateway.gateway.token_secret = Some(token_secret);
        gateway.gateway.agent_credential = Some(agent_credential.clone());
        components.push(layout.gateway(args.gateway_port, &gateway)?);
        let mut dashboard = config.clone();
        let d = &mut dashboard.dashboard;
        d.listen = SocketAddr::from((LOOPBACK, args.dashboard_port));
        d.instances = gateway.gateway.instances.clone();
        d.gateways = vec![url(layout.scheme, args.gateway_port)];
        d.supervisor = Some(url(layout.scheme, args.supervisor_port));
        d.admin_token = Some(admin_token.clone());
        d.agent_credential = Some(agent_credential.clone());
        d.state_dir = Some(data_dir.join("dashboard"));
        components.push(layout.dashboard(args.dashboard_port, &dashboard)?);
        let prometheus_yml = write_prometheus_config(&data_dir, &components, &config.http)?;
        if args.with_prometheus {
            components.push(layout.prometheus(args.prometheus_port, &prometheus_yml)?);
        }
        Ok(Plan {
            gateway_url: url(layout.scheme, args.gateway_port),
            dashboard_url: url(layout.scheme, args.dashboard_port),
            supervisor_addr: SocketAddr::from((LOOPBACK, args.supervisor_port)),
            data_dir,
            config,
            log_format: args.component_log_format,
            admin_token,
            agent_credential,
            token_secret_file,
            cluster_secret_file,
            components,
        })
    }

    /// The supervisor API's own URL.
    pub fn supervisor_url(&self) -> String {
        url(self.config.http.scheme(), self.supervisor_addr.port())
    }

    pub fn store(&self) -> StoreBackend {
        self.config.server.store
    }

    pub fn instances(&self) -> impl Iterator<Item = &ComponentSpec> {
        self.components.iter().filter(|c| c.kind == Kind::Instance)
    }

    /// Every port this cluster will serve (or has reserved), with what for.
    pub fn ports(&self) -> Vec<(u16, String)> {
        let mut ports: Vec<(u16, String)> = self
            .components
            .iter()
            .map(|c| (c.port, c.id.clone()))
            .collect();
        ports.push((self.supervisor_addr.port(), "the supervisor API".into()));
        ports
    }

    /// Refuse to start when another process already listens on one of our
    /// ports (or two of ours collide): the cluster's health checks would
    /// otherwise reach someone else's processes.
    pub fn check_ports_free(&self) -> anyhow::Result<()> {
        let ports = self.ports();
        for (i, (port, what)) in ports.iter().enumerate() {
            if let Some((_, other)) = ports[..i].iter().find(|(p, _)| p == port) {
                anyhow::bail!("port {port} is given to both {other} and {what}");
            }
            if let Err(e) = std::net::TcpListener::bind(SocketAddr::from((LOOPBACK, *port))) {
                anyhow::bail!(
                    "port {port} (for {what}) is not free: {e}; is another confab cluster running? Choose other ports (--gateway-port, --instance-base-port, --supervisor-port, --dashboard-port)"
                );
            }
        }
        Ok(())
    }
}

/// Where a component's files go.
struct Layout<'a> {
    data_dir: &'a Path,
    logs: &'a Path,
    run: PathBuf,
    scheme: &'static str,
}

impl Layout<'_> {
    /// Instance `inst-<i>`: the shared configuration with its own id, port,
    /// the cluster's SQLite file and the admin token.
    fn instance(
        &self,
        i: u16,
        port: u16,
        config: &Config,
        admin_token: &str,
    ) -> anyhow::Result<ComponentSpec> {
        let id = format!("inst-{i}");
        let mut c = config.clone();
        c.server.instance_id = id.clone();
        c.server.listen = SocketAddr::from((LOOPBACK, port));
        c.server.sqlite_path = self.data_dir.join("confab.db");
        c.server.admin_token = Some(admin_token.to_owned());
        let config_file = self.run.join(format!("{id}.toml"));
        write_config(
            &config_file,
            &c,
            &[
                Section::Settings,
                Section::Cassandra,
                Section::Server,
                Section::Cluster,
                Section::Http,
            ],
        )?;
        Ok(ComponentSpec {
            kind: Kind::Instance,
            port,
            url: url(self.scheme, port),
            program: Program::Confab {
                subcommand: "server",
                config_file,
            },
            log: self.logs.join(format!("{id}.log")),
            id,
        })
    }

    /// The gateway, with only the `[gateway]` section (no instance secrets).
    fn gateway(&self, port: u16, config: &Config) -> anyhow::Result<ComponentSpec> {
        let config_file = self.run.join("gateway.toml");
        write_config(
            &config_file,
            config,
            &[Section::Gateway, Section::Cluster, Section::Http],
        )?;
        Ok(ComponentSpec {
            id: "gateway".into(),
            kind: Kind::Gateway,
            port,
            url: url(self.scheme, port),
            program: Program::Confab {
                subcommand: "gateway",
                config_file,
            },
            log: self.logs.join("gateway.log"),
        })
    }

    /// The dashboard, with only the `[dashboard]` section: the admin token
    /// (which operators sign in with) and where everything is.
    fn dashboard(&self, port: u16, config: &Config) -> anyhow::Result<ComponentSpec> {
        let config_file = self.run.join("dashboard.toml");
        // The cluster secret: the gateways' events are behind it.
        write_config(
            &config_file,
            config,
            &[Section::Dashboard, Section::Cluster, Section::Http],
        )?;
        Ok(ComponentSpec {
            id: "dashboard".into(),
            kind: Kind::Dashboard,
            port,
            url: url(self.scheme, port),
            program: Program::Confab {
                subcommand: "dashboard",
                config_file,
            },
            log: self.logs.join("dashboard.log"),
        })
    }

    fn prometheus(&self, port: u16, config_file: &Path) -> anyhow::Result<ComponentSpec> {
        let path = which("prometheus").context(
            "--with-prometheus: no `prometheus` binary on PATH (Debian: apt-get install prometheus)",
        )?;
        Ok(ComponentSpec {
            id: "prometheus".into(),
            kind: Kind::Prometheus,
            port,
            url: url(self.scheme, port),
            program: Program::External {
                path,
                args: vec![
                    format!("--config.file={}", config_file.display()),
                    format!(
                        "--storage.tsdb.path={}",
                        self.data_dir.join("prometheus").display()
                    ),
                    format!("--web.listen-address=127.0.0.1:{port}"),
                    "--web.enable-lifecycle".into(),
                ],
            },
            log: self.logs.join("prometheus.log"),
        })
    }
}

/// A secret kept in `path` across runs (made on the first).
fn kept_secret(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let s = random_token();
            data_dir::write_private(path, &s)?;
            Ok(s)
        }
    }
}

fn write_config(path: &Path, config: &Config, sections: &[Section]) -> anyhow::Result<()> {
    let text = format!(
        "# Written by `confab up` for this component; rewritten at every start.\n{}",
        config.to_toml(sections)
    );
    data_dir::write_private(path, &text).with_context(|| format!("writing {}", path.display()))
}

/// The alert rules, shipped inside the binary so `confab up` works anywhere.
const ALERT_RULES: &str = include_str!("../../../alerts/confab-rules.yml");
const ALERT_RUNBOOKS: &str = include_str!("../../../alerts/README.md");

/// Write `<data-dir>/prometheus.yml` (targets: every instance as job
/// `confab`, the gateway as `confab-gateway`) and the alert rules beside it.
fn write_prometheus_config(
    data_dir: &Path,
    components: &[ComponentSpec],
    http: &crate::config::HttpConfig,
) -> anyhow::Result<PathBuf> {
    let rules = data_dir.join("confab-rules.yml");
    std::fs::write(&rules, ALERT_RULES)?;
    // The alerts' runbook_url points into the runbooks beside the rules.
    let runbooks = data_dir.join("confab-alerts.md");
    std::fs::write(&runbooks, ALERT_RUNBOOKS)?;
    let targets = |kind: Kind| -> String {
        components
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| format!("'127.0.0.1:{}'", c.port))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Over TLS, Prometheus trusts what the components trust.
    let tls = match (http.scheme(), &http.tls_ca_file) {
        ("https", Some(ca)) => format!(
            "    scheme: https\n    tls_config:\n      ca_file: {}\n",
            ca.display()
        ),
        ("https", None) => "    scheme: https\n".to_owned(),
        _ => String::new(),
    };
    let text = [
        "# Written by `confab up`: scrape every component of the local cluster.".to_owned(),
        "global:".into(),
        "  scrape_interval: 5s".into(),
        "  evaluation_interval: 5s".into(),
        "  external_labels:".into(),
        format!(
            "    confab_runbook_url: 'file://{}'",
            std::path::absolute(&runbooks)?.display()
        ),
        "rule_files:".into(),
        format!("  - {}", rules.display()),
        "scrape_configs:".into(),
        "  - job_name: confab".into(),
        format!("{tls}    static_configs:"),
        format!("      - targets: [{}]", targets(Kind::Instance)),
        "        labels: {cluster: 'confab-up'}".into(),
        "  - job_name: confab-gateway".into(),
        format!("{tls}    static_configs:"),
        format!("      - targets: [{}]", targets(Kind::Gateway)),
        "        labels: {cluster: 'confab-up'}".into(),
        String::new(),
    ]
    .join("\n");
    let path = data_dir.join("prometheus.yml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}
