//! Layered configuration: TOML file, then `CONFAB_<SECTION>_<OPTION>`
//! environment variables, then `--set section.option=value` flags. Raw values
//! become typed values once, here, and an invalid value stops start-up with
//! an error naming the option, the value and the valid choices.
//!
//! Option names follow the reference chat server (`[settings]`,
//! `[cassandra]`) so that its operators recognise them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("invalid value {value} for option `{option}`: expected {expected}")]
    Invalid {
        option: String,
        value: String,
        expected: String,
    },
    #[error("unknown option `{0}` (see the README's configuration reference)")]
    Unknown(String),
    #[error("cannot read configuration file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("malformed override `{0}`: expected section.option=value")]
    Override(String),
}

type Result<T> = std::result::Result<T, ConfigError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorationMode {
    Simple,
    None,
}

/// `transcript-auto-save`: 0 off, 1 save after each message, 2 save and
/// notify clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoSave {
    Off,
    Save,
    SaveAndNotify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOnError {
    Close,
    Continue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub session_restoration_mode: RestorationMode,
    pub transcript_auto_save: AutoSave,
    pub transcript_save_on_error: SaveOnError,
    pub transcript_resend_attempts: u32,
    pub transcript_resend_delay: Duration,
    pub transcript_save_notices: bool,
}

impl Settings {
    /// Restoration works only when transcripts are saved (as the reference
    /// says: no effect when `transcript-auto-save` = 0).
    pub fn restoration_enabled(&self) -> bool {
        self.session_restoration_mode == RestorationMode::Simple
            && self.transcript_auto_save != AutoSave::Off
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Any,
    One,
    Two,
    Three,
    Quorum,
    All,
    LocalQuorum,
    EachQuorum,
    LocalOne,
}

impl Consistency {
    const CHOICES: &'static str =
        "one of ANY, ONE, TWO, THREE, QUORUM, ALL, LOCAL_QUORUM, EACH_QUORUM, LOCAL_ONE";

    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "ANY" => Consistency::Any,
            "ONE" => Consistency::One,
            "TWO" => Consistency::Two,
            "THREE" => Consistency::Three,
            "QUORUM" => Consistency::Quorum,
            "ALL" => Consistency::All,
            "LOCAL_QUORUM" => Consistency::LocalQuorum,
            "EACH_QUORUM" => Consistency::EachQuorum,
            "LOCAL_ONE" => Consistency::LocalOne,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CassandraConfig {
    pub contact_points: Vec<String>,
    pub keyspace: String,
    pub local_dc: String,
    pub read_consistency: Consistency,
    pub write_consistency: Consistency,
    pub username: String,
    pub password: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub reconnect_timeout: Duration,
    /// Wait for schema agreement after DDL (`confab cassandra init`). Off
    /// only for single test nodes that cannot report it (empty system.peers).
    pub await_schema_agreement: bool,
    /// Start even when the consistency levels do not make reads and writes
    /// overlap (R + W <= RF): fencing no longer holds. Logged loudly.
    pub unsafe_consistency: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreBackend {
    Sqlite,
    Cassandra,
}

const BACKENDS: &[(&str, StoreBackend)] = &[
    ("sqlite", StoreBackend::Sqlite),
    ("cassandra", StoreBackend::Cassandra),
];

/// SQLite `PRAGMA synchronous` for the session store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    Off,
    Normal,
    Full,
    Extra,
}

impl Synchronous {
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// `[server]`: one chat server instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub instance_id: String,
    pub listen: SocketAddr,
    pub store: StoreBackend,
    pub sqlite_path: PathBuf,
    pub sqlite_synchronous: Synchronous,
    /// How long a write waits for another process's lock on the SQLite file
    /// before the save counts as failed (and is retried per the settings).
    pub sqlite_busy_timeout: Duration,
    /// Where final transcripts go: the session store's backend unless
    /// chosen. With Cassandra every instance on every host writes them to
    /// one table, so any instance can read any closed chat back.
    pub contact_store: StoreBackend,
    /// The SQLite contact store's file; defaults to the session store's.
    pub contact_store_path: Option<PathBuf>,
    /// Where gateways reach this instance, as registered in the session
    /// store; None: `http(s)://<listen>` (refused for an unspecified
    /// address such as 0.0.0.0, which nobody else can reach).
    pub advertise_url: Option<String>,
    pub admin_token: Option<String>,
    /// `POST /admin/kill` (SIGKILL itself, for restoration tests outside
    /// `confab up`); off unless turned on.
    pub admin_kill_enabled: bool,
    /// Most group-committed operations in one store transaction.
    pub max_batch: usize,
    /// A waiting chat no agent took by then is closed; zero: never.
    pub waiting_timeout: Duration,
    /// A chat's cap: events, and bytes of message text.
    pub max_transcript_events: usize,
    pub max_transcript_bytes: usize,
}

/// An address or a network (`10.0.0.0/8`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn bits(ip: IpAddr) -> (u128, u8) {
            match ip {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => (u128::from(u32::from(v4)), 32),
                    None => (u128::from(v6), 128),
                },
            }
        }
        let ((net, width), (ip, ip_width)) = (bits(self.addr), bits(ip));
        if width != ip_width {
            return false;
        }
        let shift = u32::from(width - self.prefix.min(width));
        shift >= 128 || (net >> shift) == (ip >> shift)
    }
}

/// `[gateway]`: the public chat API.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub instances: Vec<String>,
    /// Also find instances in the session store's registry (the `[server]`
    /// store options and `[cassandra]` say where it is).
    pub discover: bool,
    pub token_secret: Option<String>,
    pub agent_credential: Option<String>,
    pub allowed_origins: Vec<String>,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    pub health_interval: Duration,
    /// Reach the instances over one multiplexed channel each (crate::channel);
    /// false: one HTTP/1.1 request per call.
    pub instance_channel: bool,
    pub max_sockets_per_participant: usize,
    /// A participant's WebSocket is pinged this often, and closed when it
    /// has sent nothing (a pong included) for two of these.
    pub ws_ping_interval: Duration,
    /// A participant token is refused this long after it was issued (an
    /// active client refreshes it).
    pub token_ttl: Duration,
    /// Per-agent secrets, by hash (crate::gateway::agents).
    pub agents_file: Option<PathBuf>,
    /// An agent's credential reads closed chats' final transcripts (the
    /// contact history), whole, whoever took part.
    pub agents_read_closed_chats: bool,
    /// Proxies whose `X-Forwarded-For` / `Forwarded` name the client.
    pub trusted_proxies: Vec<IpNet>,
}

/// `[dashboard]`: the operator dashboard (`confab dashboard`).
#[derive(Debug, Clone, PartialEq)]
pub struct DashboardConfig {
    pub listen: SocketAddr,
    pub instances: Vec<String>,
    pub gateways: Vec<String>,
    /// A `confab up` supervisor: kills and restarts instances for the
    /// restoration test and the rolling restart.
    pub supervisor: Option<String>,
    /// What operators sign in with; also what the dashboard's server
    /// presents to the instances' and the supervisor's admin routes.
    pub admin_token: Option<String>,
    pub session_ttl: Duration,
    /// How long one instance may take to answer before it shows as down.
    pub instance_timeout: Duration,
    /// The restoration test joins its chats as an agent.
    pub agent_credential: Option<String>,
    /// Where the restoration tests' history is kept ("": in memory only).
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub settings: Settings,
    pub cassandra: CassandraConfig,
    pub server: ServerConfig,
    pub gateway: GatewayConfig,
    pub cluster: ClusterConfig,
    pub dashboard: DashboardConfig,
    pub http: HttpConfig,
}

/// `[http]`: how every listener serves (instance, gateway, dashboard,
/// supervisor) and what the components trust when they call each other
/// (crate::listener, crate::tls).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// A request's head must arrive within this of the connection opening or
    /// of the previous answer: slow clients and idle keep-alives end then.
    pub header_timeout: Duration,
    /// Deadline on reading one whole request body.
    pub body_timeout: Duration,
    /// Open connections (WebSockets included) one client address may hold;
    /// 0: no cap.
    pub max_connections_per_address: usize,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// CA certificates trusted for `https://` URLs of other components;
    /// none: the system's roots.
    pub tls_ca_file: Option<PathBuf>,
}

impl HttpConfig {
    /// The listener's certificate and key, when it serves TLS.
    pub fn tls_identity(&self) -> Option<(&Path, &Path)> {
        Some((
            self.tls_cert_file.as_deref()?,
            self.tls_key_file.as_deref()?,
        ))
    }

    /// The scheme this process's listeners speak.
    pub fn scheme(&self) -> &'static str {
        if self.tls_identity().is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// `[cluster]`: what every instance and gateway of one cluster share.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Authenticates every call on the instances' internal API and channel
    /// (the gateways', the dashboard's); required by instances and gateways.
    pub secret: Option<String>,
}

/// One option: its section and name, its default (a TOML literal) and what
/// it does. This table is the one source of option names and defaults: the
/// TOML file, the `CONFAB_…` environment, `--set` and the typed flags are
/// all checked against it, `resolve` takes its defaults from it, and the
/// README's configuration block is generated from it (`confab config
/// defaults`; a test compares the two).
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    pub section: &'static str,
    pub name: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

const fn opt(
    section: &'static str,
    name: &'static str,
    default: &'static str,
    doc: &'static str,
) -> OptionSpec {
    OptionSpec {
        section,
        name,
        default,
        doc,
    }
}

pub const OPTIONS: &[OptionSpec] = &[
    opt(
        "settings",
        "session-restoration-mode",
        r#""simple""#,
        r#""simple" | "none"; no effect when transcript-auto-save = 0"#,
    ),
    opt(
        "settings",
        "transcript-auto-save",
        "1",
        "0 off, 1 save after each message, 2 save and notify clients",
    ),
    opt(
        "settings",
        "transcript-save-on-error",
        r#""close""#,
        r#""close" | "continue""#,
    ),
    opt(
        "settings",
        "transcript-resend-attempts",
        "3",
        "retries of a failed save (0-100)",
    ),
    opt(
        "settings",
        "transcript-resend-delay",
        r#""1s""#,
        "between retries",
    ),
    opt(
        "settings",
        "transcript-save-notices",
        "true",
        "tell participants when a save failed",
    ),
    opt(
        "cassandra",
        "contact-points",
        r#"["127.0.0.1:9042"]"#,
        "used when server.store = \"cassandra\"",
    ),
    opt(
        "cassandra",
        "keyspace",
        r#""confab""#,
        "1 to 48 letters, digits or underscores",
    ),
    opt(
        "cassandra",
        "local-dc",
        r#""datacenter1""#,
        r#""": no preference (a single-DC cluster)"#,
    ),
    opt(
        "cassandra",
        "read-consistency",
        r#""QUORUM""#,
        "ANY ONE TWO THREE QUORUM ALL LOCAL_QUORUM EACH_QUORUM LOCAL_ONE",
    ),
    opt(
        "cassandra",
        "write-consistency",
        r#""QUORUM""#,
        "the same choices",
    ),
    opt("cassandra", "username", r#""""#, r#""": no authentication"#),
    opt("cassandra", "password", r#""""#, "or password-file"),
    opt(
        "cassandra",
        "password-file",
        r#""""#,
        "a file holding the password",
    ),
    opt(
        "cassandra",
        "tls-ca-file",
        r#""""#,
        "CA certificate (PEM): TLS to the nodes",
    ),
    opt(
        "cassandra",
        "reconnect-timeout",
        r#""5s""#,
        "connection and request timeout",
    ),
    opt(
        "cassandra",
        "await-schema-agreement",
        "true",
        "false only for single test nodes (empty system.peers)",
    ),
    opt(
        "cassandra",
        "unsafe-consistency",
        "false",
        "true: start although R + W <= RF (no fencing)",
    ),
    opt("server", "instance-id", r#""""#, r#""": confab-<port>"#),
    opt(
        "server",
        "listen",
        r#""127.0.0.1:7001""#,
        "address of the instance's HTTP API",
    ),
    opt(
        "server",
        "store",
        r#""sqlite""#,
        r#""sqlite" | "cassandra""#,
    ),
    opt(
        "server",
        "sqlite-path",
        r#"".confab/confab.db""#,
        "the SQLite session store, shared by the instances of one host",
    ),
    opt(
        "server",
        "sqlite-synchronous",
        r#""full""#,
        "off | normal | full | extra",
    ),
    opt(
        "server",
        "sqlite-busy-timeout",
        r#""5s""#,
        "wait for another process's write lock before a save fails",
    ),
    opt(
        "server",
        "contact-store",
        r#""""#,
        r#""sqlite" | "cassandra" (final transcripts); "": as store"#,
    ),
    opt(
        "server",
        "contact-store-path",
        r#""""#,
        r#""": the session store's file (contact-store = "sqlite")"#,
    ),
    opt(
        "server",
        "advertise-url",
        r#""""#,
        r#"where gateways reach it, registered in the session store; "": from listen"#,
    ),
    opt(
        "server",
        "admin-token",
        r#""""#,
        "or admin-token-file; /admin answers 401 without it",
    ),
    opt(
        "server",
        "admin-token-file",
        r#""""#,
        "a file holding the admin token",
    ),
    opt(
        "server",
        "admin-kill-enabled",
        "false",
        "POST /admin/kill (SIGKILL itself) for restoration tests",
    ),
    opt(
        "server",
        "max-batch",
        "512",
        "most saves group-committed in one transaction (1-100000)",
    ),
    opt(
        "server",
        "waiting-timeout",
        r#""30m""#,
        "a chat no agent took by then is closed (reason no-agent); \"0s\": never",
    ),
    opt(
        "server",
        "max-transcript-events",
        "10000",
        "events a chat may hold; over it a new message gets 409 transcript_full",
    ),
    opt(
        "server",
        "max-transcript-bytes",
        "8388608",
        "bytes of message text a chat may hold (8 MiB); likewise",
    ),
    opt(
        "gateway",
        "listen",
        r#""127.0.0.1:8080""#,
        "address of the public chat API and pages",
    ),
    opt(
        "gateway",
        "instances",
        "[]",
        r#"instance base URLs, e.g. ["http://127.0.0.1:7001"]"#,
    ),
    opt(
        "gateway",
        "discover",
        "false",
        "also find instances in the session store ([server] store, [cassandra])",
    ),
    opt(
        "gateway",
        "token-secret",
        r#""""#,
        "or token-secret-file; gateways sharing it serve the same chats",
    ),
    opt(
        "gateway",
        "token-secret-file",
        r#""""#,
        "a file holding the token secret",
    ),
    opt(
        "gateway",
        "agent-credential",
        r#""""#,
        "what agents present to join chats and read the queue",
    ),
    opt(
        "gateway",
        "allowed-origins",
        "[]",
        "WebSocket origins besides the gateway's own",
    ),
    opt(
        "gateway",
        "rate-limit-per-second",
        "20",
        "requests per second and participant (or client address)",
    ),
    opt(
        "gateway",
        "rate-limit-burst",
        "40",
        "bursts up to this many",
    ),
    opt(
        "gateway",
        "health-interval",
        r#""250ms""#,
        "how often each instance is checked",
    ),
    opt(
        "gateway",
        "instance-channel",
        "true",
        "false: one HTTP/1.1 request per call to an instance",
    ),
    opt(
        "gateway",
        "trusted-proxies",
        "[]",
        "reverse proxies whose X-Forwarded-For names the client, e.g. [\"10.0.0.0/8\"]",
    ),
    opt(
        "gateway",
        "max-sockets-per-participant",
        "8",
        "WebSockets one participant may hold open at once (tabs, devices)",
    ),
    opt(
        "gateway",
        "ws-ping-interval",
        r#""20s""#,
        "ping each WebSocket this often; silent for two of these: closed",
    ),
    opt(
        "gateway",
        "token-ttl",
        r#""12h""#,
        "participant tokens expire after this; POST /api/v1/chats/{id}/token renews",
    ),
    opt(
        "gateway",
        "agents-file",
        r#""""#,
        "per-agent secrets by hash (confab agents add); read again when changed",
    ),
    opt(
        "gateway",
        "agents-read-closed-chats",
        "true",
        "the agent credential reads any closed chat's final transcript, whole",
    ),
    opt(
        "dashboard",
        "listen",
        r#""127.0.0.1:8090""#,
        "address of the operator dashboard",
    ),
    opt(
        "dashboard",
        "instances",
        "[]",
        r#"instance base URLs, e.g. ["http://127.0.0.1:7001"]"#,
    ),
    opt(
        "dashboard",
        "gateways",
        "[]",
        "gateway base URLs, for their failover counts",
    ),
    opt(
        "dashboard",
        "supervisor",
        r#""""#,
        "a confab up supervisor's URL: kills and restarts for tests and rolling restarts",
    ),
    opt(
        "dashboard",
        "admin-token",
        r#""""#,
        "or admin-token-file; required: operators sign in with it",
    ),
    opt(
        "dashboard",
        "admin-token-file",
        r#""""#,
        "a file holding the admin token",
    ),
    opt(
        "dashboard",
        "agent-credential",
        r#""""#,
        "or agent-credential-file; the restoration test joins its chats as an agent",
    ),
    opt(
        "dashboard",
        "agent-credential-file",
        r#""""#,
        "a file holding the agent credential",
    ),
    opt(
        "dashboard",
        "state-dir",
        r#""""#,
        "where the restoration tests' history is kept (\"\": in memory only)",
    ),
    opt(
        "dashboard",
        "session-ttl",
        r#""12h""#,
        "a sign-in lasts this long",
    ),
    opt(
        "dashboard",
        "instance-timeout",
        r#""800ms""#,
        "an instance slower than this to answer shows as down",
    ),
    opt(
        "cluster",
        "secret",
        r#""""#,
        "or secret-file; required: shared by the cluster's instances and gateways",
    ),
    opt(
        "cluster",
        "secret-file",
        r#""""#,
        "a file holding the cluster secret (confab up makes one)",
    ),
    opt(
        "http",
        "header-timeout",
        r#""10s""#,
        "a request head must arrive within this; also the keep-alive idle time",
    ),
    opt(
        "http",
        "body-timeout",
        r#""30s""#,
        "deadline on reading one request body",
    ),
    opt(
        "http",
        "max-connections-per-address",
        "256",
        "connections (WebSockets included) per client address; 0: no cap",
    ),
    opt(
        "http",
        "tls-cert-file",
        r#""""#,
        "PEM certificate chain: listeners serve HTTPS (with tls-key-file)",
    ),
    opt(
        "http",
        "tls-key-file",
        r#""""#,
        "PEM private key of tls-cert-file",
    ),
    opt(
        "http",
        "tls-ca-file",
        r#""""#,
        "PEM CA certificates trusted for https:// URLs (\"\": the system's)",
    ),
];

/// The option `section.option`, if there is one.
pub fn option(key: &str) -> Option<&'static OptionSpec> {
    let (section, name) = key.split_once('.')?;
    OPTIONS
        .iter()
        .find(|o| o.section == section && o.name == name)
}

/// The README's configuration block: every option with its default and
/// what it does, section by section.
pub fn defaults_toml() -> String {
    let mut out = String::new();
    let mut section = "";
    for o in OPTIONS {
        if o.section != section {
            if !section.is_empty() {
                out.push('\n');
            }
            section = o.section;
            out.push_str(&format!("[{section}]\n"));
        }
        let line = format!("{} = {}", o.name, o.default);
        out.push_str(&format!("{line:<38}# {}\n", o.doc));
    }
    out
}

/// The environment variable for an option: `CONFAB_SETTINGS_TRANSCRIPT_AUTO_SAVE`.
pub fn env_name(section: &str, option: &str) -> String {
    format!("CONFAB_{section}_{option}")
        .to_ascii_uppercase()
        .replace('-', "_")
}

/// Raw option values after layering, keyed by "section.option".
#[derive(Debug, Default, Clone)]
pub struct Layers {
    values: BTreeMap<String, Value>,
}

impl Layers {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::File { reason, .. } => ConfigError::File {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::File {
                path: "<toml>".into(),
                reason: e.to_string(),
            })?;
        let mut layers = Layers::default();
        for (section, body) in table {
            let Value::Table(body) = body else {
                return Err(ConfigError::Unknown(section));
            };
            for (option, value) in body {
                layers.set(&format!("{section}.{option}"), value)?;
            }
        }
        Ok(layers)
    }

    fn set(&mut self, key: &str, value: Value) -> Result<()> {
        if option(key).is_none() {
            return Err(ConfigError::Unknown(key.to_owned()));
        }
        self.values.insert(key.to_owned(), value);
        Ok(())
    }

    /// Overlay `CONFAB_…` variables from `env`.
    pub fn with_env(mut self, env: impl IntoIterator<Item = (String, String)>) -> Self {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for o in OPTIONS {
            if let Some(v) = env.get(&env_name(o.section, o.name)) {
                self.values.insert(
                    format!("{}.{}", o.section, o.name),
                    Value::String(v.clone()),
                );
            }
        }
        self
    }

    /// Overlay `section.option=value` flags.
    pub fn with_overrides<'a>(
        mut self,
        overrides: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self> {
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| ConfigError::Override(o.to_owned()))?;
            self.set(key.trim(), Value::String(value.trim().to_owned()))?;
        }
        Ok(self)
    }

    /// Set one option from a typed command-line flag.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Result<Self> {
        self.set(key, Value::String(value.into()))?;
        Ok(self)
    }

    /// The option's value: as given, or its default from [`OPTIONS`].
    fn value(&self, key: &str) -> Value {
        if let Some(v) = self.values.get(key) {
            return v.clone();
        }
        let spec = option(key).unwrap_or_else(|| panic!("option {key} is not in OPTIONS"));
        format!("v = {}", spec.default)
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| panic!("the default of {key} is no TOML value"))
    }

    fn invalid(key: &str, v: &Value, expected: &str) -> ConfigError {
        let value = match v {
            Value::String(s) => format!("\"{s}\""),
            other => other.to_string(),
        };
        ConfigError::Invalid {
            option: key.to_owned(),
            value,
            expected: expected.to_owned(),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.value(key) {
            Value::String(s) => Ok(s),
            v => Err(Self::invalid(key, &v, "a string")),
        }
    }

    /// A string option whose empty value means "not set".
    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        let s = self.string(key)?;
        Ok(if s.is_empty() { None } else { Some(s) })
    }

    fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)]) -> Result<T> {
        let v = self.value(key);
        let text = match &v {
            Value::String(s) => s.clone(),
            Value::Integer(i) => i.to_string(),
            other => other.to_string(),
        };
        choices
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                Self::invalid(key, &v, &format!("one of {}", names.join(", ")))
            })
    }

    fn integer(&self, key: &str, min: u64, max: u64) -> Result<u64> {
        let expected = format!("an integer from {min} to {max}");
        let v = self.value(key);
        let n = match &v {
            Value::Integer(i) => {
                u64::try_from(*i).map_err(|_| Self::invalid(key, &v, &expected))?
            }
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| Self::invalid(key, &v, &expected))?,
            _ => return Err(Self::invalid(key, &v, &expected)),
        };
        if n < min || n > max {
            return Err(Self::invalid(key, &Value::Integer(n as i64), &expected));
        }
        Ok(n)
    }

    fn boolean(&self, key: &str) -> Result<bool> {
        match self.value(key) {
            Value::Boolean(b) => Ok(b),
            Value::String(s) if s == "true" => Ok(true),
            Value::String(s) if s == "false" => Ok(false),
            v => Err(Self::invalid(key, &v, "true or false")),
        }
    }

    fn duration(&self, key: &str) -> Result<Duration> {
        let expected = "a duration such as \"500ms\", \"1s\" or \"2m\"";
        match self.value(key) {
            Value::String(s) => humantime::parse_duration(s.trim())
                .map_err(|_| Self::invalid(key, &Value::String(s.clone()), expected)),
            v => Err(Self::invalid(key, &v, expected)),
        }
    }

    fn list(&self, key: &str) -> Result<Vec<String>> {
        match self.value(key) {
            Value::String(s) => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()),
            Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(Self::invalid(
                        key,
                        &Value::Array(items.clone()),
                        "a list of strings",
                    )),
                })
                .collect(),
            v => Err(Self::invalid(key, &v, "a list of strings")),
        }
    }

    fn socket(&self, key: &str) -> Result<SocketAddr> {
        let s = self.string(key)?;
        s.parse()
            .map_err(|_| Self::invalid(key, &Value::String(s), "an address such as 127.0.0.1:7001"))
    }

    /// A secret from `key` or from the file named by `key-file`.
    fn secret(&self, key: &str) -> Result<Option<String>> {
        if let Some(s) = self.opt_string(key)? {
            return Ok(Some(s));
        }
        let file_key = format!("{key}-file");
        match self.opt_string(&file_key)? {
            None => Ok(None),
            Some(path) => std::fs::read_to_string(&path)
                .map(|s| Some(s.trim().to_owned()))
                .map_err(|e| ConfigError::Invalid {
                    option: file_key,
                    value: format!("\"{path}\""),
                    expected: format!("a readable file ({e})"),
                }),
        }
    }

    pub fn resolve(&self) -> Result<Config> {
        let settings = Settings {
            session_restoration_mode: self.choice(
                "settings.session-restoration-mode",
                &[
                    ("simple", RestorationMode::Simple),
                    ("none", RestorationMode::None),
                ],
            )?,
            transcript_auto_save: self.choice(
                "settings.transcript-auto-save",
                &[
                    ("0", AutoSave::Off),
                    ("1", AutoSave::Save),
                    ("2", AutoSave::SaveAndNotify),
                ],
            )?,
            transcript_save_on_error: self.choice(
                "settings.transcript-save-on-error",
                &[
                    ("close", SaveOnError::Close),
                    ("continue", SaveOnError::Continue),
                ],
            )?,
            transcript_resend_attempts: self.integer(
                "settings.transcript-resend-attempts",
                0,
                100,
            )? as u32,
            transcript_resend_delay: self.duration("settings.transcript-resend-delay")?,
            transcript_save_notices: self.boolean("settings.transcript-save-notices")?,
        };
        let consistency = |key: &str| -> Result<Consistency> {
            let s = self.string(key)?;
            Consistency::parse(&s)
                .ok_or_else(|| Self::invalid(key, &Value::String(s), Consistency::CHOICES))
        };
        let cassandra = CassandraConfig {
            contact_points: self.list("cassandra.contact-points")?,
            keyspace: self.string("cassandra.keyspace")?,
            local_dc: self.string("cassandra.local-dc")?,
            read_consistency: consistency("cassandra.read-consistency")?,
            write_consistency: consistency("cassandra.write-consistency")?,
            username: self.string("cassandra.username")?,
            password: self.secret("cassandra.password")?,
            tls_ca_file: self.opt_string("cassandra.tls-ca-file")?.map(PathBuf::from),
            reconnect_timeout: self.duration("cassandra.reconnect-timeout")?,
            await_schema_agreement: self.boolean("cassandra.await-schema-agreement")?,
            unsafe_consistency: self.boolean("cassandra.unsafe-consistency")?,
        };
        if cassandra.contact_points.is_empty() {
            return Err(ConfigError::Invalid {
                option: "cassandra.contact-points".into(),
                value: "[]".into(),
                expected: "at least one HOST:PORT".into(),
            });
        }
        let keyspace_ok = !cassandra.keyspace.is_empty()
            && cassandra.keyspace.len() <= 48
            && cassandra
                .keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !keyspace_ok {
            return Err(Self::invalid(
                "cassandra.keyspace",
                &Value::String(cassandra.keyspace.clone()),
                "1 to 48 letters, digits or underscores",
            ));
        }
        let listen = self.socket("server.listen")?;
        let store = self.choice("server.store", BACKENDS)?;
        let server = ServerConfig {
            instance_id: self
                .opt_string("server.instance-id")?
                .unwrap_or_else(|| format!("confab-{}", listen.port())),
            listen,
            store,
            sqlite_path: PathBuf::from(self.string("server.sqlite-path")?),
            sqlite_synchronous: self.choice(
                "server.sqlite-synchronous",
                &[
                    ("off", Synchronous::Off),
                    ("normal", Synchronous::Normal),
                    ("full", Synchronous::Full),
                    ("extra", Synchronous::Extra),
                ],
            )?,
            sqlite_busy_timeout: self.duration("server.sqlite-busy-timeout")?,
            contact_store: match self.opt_string("server.contact-store")? {
                None => store,
                Some(_) => self.choice("server.contact-store", BACKENDS)?,
            },
            contact_store_path: self
                .opt_string("server.contact-store-path")?
                .map(PathBuf::from),
            advertise_url: self
                .opt_string("server.advertise-url")?
                .map(|u| u.trim_end_matches('/').to_owned()),
            admin_token: self.secret("server.admin-token")?,
            admin_kill_enabled: self.boolean("server.admin-kill-enabled")?,
            max_batch: self.integer("server.max-batch", 1, 100_000)? as usize,
            waiting_timeout: self.duration("server.waiting-timeout")?,
            max_transcript_events: self.integer("server.max-transcript-events", 100, 10_000_000)?
                as usize,
            max_transcript_bytes: self.integer("server.max-transcript-bytes", 65_536, 1 << 30)?
                as usize,
        };
        if !crate::contract::is_instance_id(&server.instance_id) {
            return Err(Self::invalid(
                "server.instance-id",
                &Value::String(server.instance_id.clone()),
                "letters, digits, '-', '_' or '.'",
            ));
        }
        let gateway = GatewayConfig {
            listen: self.socket("gateway.listen")?,
            instances: self.list("gateway.instances")?,
            discover: self.boolean("gateway.discover")?,
            token_secret: self.secret("gateway.token-secret")?,
            agent_credential: self.opt_string("gateway.agent-credential")?,
            allowed_origins: self.list("gateway.allowed-origins")?,
            rate_limit_per_second: self.integer("gateway.rate-limit-per-second", 1, 1_000_000)?
                as u32,
            rate_limit_burst: self.integer("gateway.rate-limit-burst", 1, 1_000_000)? as u32,
            health_interval: self.duration("gateway.health-interval")?,
            instance_channel: self.boolean("gateway.instance-channel")?,
            max_sockets_per_participant: self.integer(
                "gateway.max-sockets-per-participant",
                1,
                1000,
            )? as usize,
            ws_ping_interval: self.duration("gateway.ws-ping-interval")?,
            token_ttl: self.duration("gateway.token-ttl")?,
            agents_file: self.opt_string("gateway.agents-file")?.map(PathBuf::from),
            agents_read_closed_chats: self.boolean("gateway.agents-read-closed-chats")?,
            trusted_proxies: self
                .list("gateway.trusted-proxies")?
                .iter()
                .map(|n| {
                    n.parse().map_err(|_| {
                        Self::invalid(
                            "gateway.trusted-proxies",
                            &Value::String(n.clone()),
                            "addresses or networks such as 10.0.0.0/8",
                        )
                    })
                })
                .collect::<Result<_>>()?,
        };
        let cluster = ClusterConfig {
            secret: self.secret("cluster.secret")?,
        };
        let dashboard = DashboardConfig {
            listen: self.socket("dashboard.listen")?,
            instances: self.list("dashboard.instances")?,
            gateways: self.list("dashboard.gateways")?,
            supervisor: self.opt_string("dashboard.supervisor")?,
            admin_token: self.secret("dashboard.admin-token")?,
            session_ttl: self.duration("dashboard.session-ttl")?,
            instance_timeout: self.duration("dashboard.instance-timeout")?,
            agent_credential: self.secret("dashboard.agent-credential")?,
            state_dir: self.opt_string("dashboard.state-dir")?.map(PathBuf::from),
        };
        let http = HttpConfig {
            header_timeout: self.duration("http.header-timeout")?,
            body_timeout: self.duration("http.body-timeout")?,
            max_connections_per_address: self.integer(
                "http.max-connections-per-address",
                0,
                10_000_000,
            )? as usize,
            tls_cert_file: self.opt_string("http.tls-cert-file")?.map(PathBuf::from),
            tls_key_file: self.opt_string("http.tls-key-file")?.map(PathBuf::from),
            tls_ca_file: self.opt_string("http.tls-ca-file")?.map(PathBuf::from),
        };
        for key in [
            "http.header-timeout",
            "http.body-timeout",
            "gateway.ws-ping-interval",
            "gateway.token-ttl",
        ] {
            let d = self.duration(key)?;
            if d < Duration::from_millis(100) {
                return Err(Self::invalid(
                    key,
                    &Value::String(humantime::format_duration(d).to_string()),
                    "at least 100ms",
                ));
            }
        }
        if http.tls_cert_file.is_some() != http.tls_key_file.is_some() {
            return Err(ConfigError::Invalid {
                option: "http.tls-key-file".into(),
                value: format!(
                    "{:?}",
                    http.tls_key_file.as_deref().unwrap_or(Path::new(""))
                ),
                expected: "both http.tls-cert-file and http.tls-key-file, or neither".into(),
            });
        }
        Ok(Config {
            settings,
            cassandra,
            server,
            gateway,
            cluster,
            dashboard,
            http,
        })
    }
}

/// The names of closed sets of values, as the configuration spells them.
impl RestorationMode {
    fn name(self) -> &'static str {
        match self {
            RestorationMode::Simple => "simple",
            RestorationMode::None => "none",
        }
    }
}

impl AutoSave {
    fn level(self) -> i64 {
        match self {
            AutoSave::Off => 0,
            AutoSave::Save => 1,
            AutoSave::SaveAndNotify => 2,
        }
    }
}

impl SaveOnError {
    fn name(self) -> &'static str {
        match self {
            SaveOnError::Close => "close",
            SaveOnError::Continue => "continue",
        }
    }
}

impl Consistency {
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Any => "ANY",
            Consistency::One => "ONE",
            Consistency::Two => "TWO",
            Consistency::Three => "THREE",
            Consistency::Quorum => "QUORUM",
            Consistency::All => "ALL",
            Consistency::LocalQuorum => "LOCAL_QUORUM",
            Consistency::EachQuorum => "EACH_QUORUM",
            Consistency::LocalOne => "LOCAL_ONE",
        }
    }
}

impl StoreBackend {
    pub fn name(self) -> &'static str {
        match self {
            StoreBackend::Sqlite => "sqlite",
            StoreBackend::Cassandra => "cassandra",
        }
    }
}

/// The sections of the configuration file, for writing a component's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Settings,
    Cassandra,
    Server,
    Gateway,
    Cluster,
    Dashboard,
    Http,
}

impl Config {
    /// The given sections as a TOML file that [`Layers::from_toml`] reads
    /// back into the same values: how `confab up` hands each component its
    /// typed configuration (and nothing of the sections it does not use).
    pub fn to_toml(&self, sections: &[Section]) -> String {
        let mut file = toml::Table::new();
        for section in sections {
            let (name, table) = match section {
                Section::Settings => ("settings", self.settings_table()),
                Section::Cassandra => ("cassandra", self.cassandra_table()),
                Section::Server => ("server", self.server_table()),
                Section::Gateway => ("gateway", self.gateway_table()),
                Section::Cluster => ("cluster", self.cluster_table()),
                Section::Dashboard => ("dashboard", self.dashboard_table()),
                Section::Http => ("http", self.http_table()),
            };
            file.insert(name.into(), Value::Table(table));
        }
        toml::to_string(&file).unwrap_or_default()
    }

    fn settings_table(&self) -> toml::Table {
        let s = &self.settings;
        let mut t = toml::Table::new();
        put(
            &mut t,
            "session-restoration-mode",
            text(s.session_restoration_mode.name()),
        );
        put(
            &mut t,
            "transcript-auto-save",
            Value::Integer(s.transcript_auto_save.level()),
        );
        put(
            &mut t,
            "transcript-save-on-error",
            text(s.transcript_save_on_error.name()),
        );
        put(
            &mut t,
            "transcript-resend-attempts",
            Value::Integer(s.transcript_resend_attempts.into()),
        );
        put(
            &mut t,
            "transcript-resend-delay",
            duration(s.transcript_resend_delay),
        );
        put(
            &mut t,
            "transcript-save-notices",
            Value::Boolean(s.transcript_save_notices),
        );
        t
    }

    fn cassandra_table(&self) -> toml::Table {
        let k = &self.cassandra;
        let mut t = toml::Table::new();
        put(&mut t, "contact-points", list(&k.contact_points));
        put(&mut t, "keyspace", text(&k.keyspace));
        put(&mut t, "local-dc", text(&k.local_dc));
        put(&mut t, "read-consistency", text(k.read_consistency.name()));
        put(
            &mut t,
            "write-consistency",
            text(k.write_consistency.name()),
        );
        put(&mut t, "username", text(&k.username));
        if let Some(pw) = &k.password {
            put(&mut t, "password", text(pw));
        }
        if let Some(ca) = &k.tls_ca_file {
            put(&mut t, "tls-ca-file", path(ca));
        }
        put(&mut t, "reconnect-timeout", duration(k.reconnect_timeout));
        put(
            &mut t,
            "await-schema-agreement",
            Value::Boolean(k.await_schema_agreement),
        );
        put(
            &mut t,
            "unsafe-consistency",
            Value::Boolean(k.unsafe_consistency),
        );
        t
    }

    fn server_table(&self) -> toml::Table {
        let s = &self.server;
        let mut t = toml::Table::new();
        put(&mut t, "instance-id", text(&s.instance_id));
        put(&mut t, "listen", text(&s.listen.to_string()));
        put(&mut t, "store", text(s.store.name()));
        put(&mut t, "sqlite-path", path(&s.sqlite_path));
        put(
            &mut t,
            "sqlite-synchronous",
            text(&s.sqlite_synchronous.pragma().to_ascii_lowercase()),
        );
        put(
            &mut t,
            "sqlite-busy-timeout",
            duration(s.sqlite_busy_timeout),
        );
        if s.contact_store != s.store {
            put(&mut t, "contact-store", text(s.contact_store.name()));
        }
        if let Some(p) = &s.contact_store_path {
            put(&mut t, "contact-store-path", path(p));
        }
        if let Some(u) = &s.advertise_url {
            put(&mut t, "advertise-url", text(u));
        }
        if let Some(token) = &s.admin_token {
            put(&mut t, "admin-token", text(token));
        }
        put(
            &mut t,
            "admin-kill-enabled",
            Value::Boolean(s.admin_kill_enabled),
        );
        put(&mut t, "max-batch", Value::Integer(s.max_batch as i64));
        put(&mut t, "waiting-timeout", duration(s.waiting_timeout));
        put(
            &mut t,
            "max-transcript-events",
            Value::Integer(s.max_transcript_events as i64),
        );
        put(
            &mut t,
            "max-transcript-bytes",
            Value::Integer(s.max_transcript_bytes as i64),
        );
        t
    }

    fn gateway_table(&self) -> toml::Table {
        let g = &self.gateway;
        let mut t = toml::Table::new();
        put(&mut t, "listen", text(&g.listen.to_string()));
        put(&mut t, "instances", list(&g.instances));
        put(&mut t, "discover", Value::Boolean(g.discover));
        if let Some(secret) = &g.token_secret {
            put(&mut t, "token-secret", text(secret));
        }
        if let Some(cred) = &g.agent_credential {
            put(&mut t, "agent-credential", text(cred));
        }
        put(&mut t, "allowed-origins", list(&g.allowed_origins));
        put(
            &mut t,
            "rate-limit-per-second",
            Value::Integer(g.rate_limit_per_second.into()),
        );
        put(
            &mut t,
            "rate-limit-burst",
            Value::Integer(g.rate_limit_burst.into()),
        );
        put(&mut t, "health-interval", duration(g.health_interval));
        put(
            &mut t,
            "instance-channel",
            Value::Boolean(g.instance_channel),
        );
        put(
            &mut t,
            "max-sockets-per-participant",
            Value::Integer(g.max_sockets_per_participant as i64),
        );
        put(&mut t, "ws-ping-interval", duration(g.ws_ping_interval));
        put(&mut t, "token-ttl", duration(g.token_ttl));
        put(
            &mut t,
            "agents-read-closed-chats",
            Value::Boolean(g.agents_read_closed_chats),
        );
        if let Some(f) = &g.agents_file {
            put(&mut t, "agents-file", path(f));
        }
        let proxies: Vec<String> = g.trusted_proxies.iter().map(IpNet::to_string).collect();
        put(&mut t, "trusted-proxies", list(&proxies));
        t
    }
}

impl Config {
    fn dashboard_table(&self) -> toml::Table {
        let d = &self.dashboard;
        let mut t = toml::Table::new();
        put(&mut t, "listen", text(&d.listen.to_string()));
        put(&mut t, "instances", list(&d.instances));
        put(&mut t, "gateways", list(&d.gateways));
        if let Some(url) = &d.supervisor {
            put(&mut t, "supervisor", text(url));
        }
        if let Some(token) = &d.admin_token {
            put(&mut t, "admin-token", text(token));
        }
        if let Some(cred) = &d.agent_credential {
            put(&mut t, "agent-credential", text(cred));
        }
        if let Some(dir) = &d.state_dir {
            put(&mut t, "state-dir", path(dir));
        }
        put(&mut t, "session-ttl", duration(d.session_ttl));
        put(&mut t, "instance-timeout", duration(d.instance_timeout));
        t
    }

    fn http_table(&self) -> toml::Table {
        let h = &self.http;
        let mut t = toml::Table::new();
        put(&mut t, "header-timeout", duration(h.header_timeout));
        put(&mut t, "body-timeout", duration(h.body_timeout));
        put(
            &mut t,
            "max-connections-per-address",
            Value::Integer(h.max_connections_per_address as i64),
        );
        for (name, file) in [
            ("tls-cert-file", &h.tls_cert_file),
            ("tls-key-file", &h.tls_key_file),
            ("tls-ca-file", &h.tls_ca_file),
        ] {
            if let Some(f) = file {
                put(&mut t, name, path(f));
            }
        }
        t
    }

    fn cluster_table(&self) -> toml::Table {
        let mut t = toml::Table::new();
        if let Some(secret) = &self.cluster.secret {
            put(&mut t, "secret", text(secret));
        }
        t
    }

    /// The cluster secret, which instances and gateways cannot run without.
    pub fn cluster_secret(&self) -> Result<&str> {
        self.cluster
            .secret
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid {
                option: "cluster.secret".into(),
                value: "\"\"".into(),
                expected: "a secret shared by every instance and gateway of the cluster (or cluster.secret-file; `confab up` makes one)".into(),
            })
    }
}

fn put(table: &mut toml::Table, option: &str, value: Value) {
    table.insert(option.to_owned(), value);
}

fn text(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn duration(d: Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string())
}

fn list(items: &[String]) -> Value {
    Value::Array(items.iter().map(|s| text(s)).collect())
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml: &str) -> Result<Config> {
        Layers::from_toml(toml)?.resolve()
    }

    fn invalid_option(r: Result<Config>) -> String {
        match r {
            Err(ConfigError::Invalid { option, .. }) => option,
            other => panic!("expected an invalid option, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_reference_recommendations() {
        let c = resolve("").unwrap();
        assert_eq!(c.settings.session_restoration_mode, RestorationMode::Simple);
        assert_eq!(c.settings.transcript_auto_save, AutoSave::Save);
        assert_eq!(c.settings.transcript_save_on_error, SaveOnError::Close);
        assert_eq!(c.settings.transcript_resend_attempts, 3);
        assert_eq!(c.settings.transcript_resend_delay, Duration::from_secs(1));
        assert!(c.settings.transcript_save_notices);
        assert_eq!(c.cassandra.read_consistency, Consistency::Quorum);
        assert_eq!(c.server.sqlite_synchronous, Synchronous::Full);
        assert!(!c.server.admin_kill_enabled);
        assert_eq!(c.server.contact_store, StoreBackend::Sqlite);
    }

    #[test]
    fn the_contact_store_follows_the_session_store_unless_chosen() {
        let backend = |toml: &str| resolve(toml).unwrap().server.contact_store;
        assert_eq!(
            backend("[server]\nstore = \"cassandra\""),
            StoreBackend::Cassandra
        );
        assert_eq!(
            backend("[server]\nstore = \"cassandra\"\ncontact-store = \"sqlite\""),
            StoreBackend::Sqlite
        );
        assert_eq!(
            backend("[server]\ncontact-store = \"cassandra\""),
            StoreBackend::Cassandra
        );
        assert!(
            invalid_option(resolve("[server]\ncontact-store = \"file\""))
                .contains("server.contact-store")
        );
    }

    #[test]
    fn every_settings_value_parses() {
        let c = resolve(
            r#"[settings]
session-restoration-mode = "none"
transcript-auto-save = 2
transcript-save-on-error = "continue"
transcript-resend-attempts = 0
transcript-resend-delay = "250ms"
transcript-save-notices = false
"#,
        )
        .unwrap();
        assert_eq!(c.settings.session_restoration_mode, RestorationMode::None);
        assert_eq!(c.settings.transcript_auto_save, AutoSave::SaveAndNotify);
        assert_eq!(c.settings.transcript_save_on_error, SaveOnError::Continue);
        assert_eq!(c.settings.transcript_resend_attempts, 0);
        assert_eq!(
            c.settings.transcript_resend_delay,
            Duration::from_millis(250)
        );
        assert!(!c.settings.transcript_save_notices);
        assert!(!c.settings.restoration_enabled());
        let off = resolve("[settings]\ntranscript-auto-save = 0\n").unwrap();
        assert_eq!(off.settings.transcript_auto_save, AutoSave::Off);
        assert!(
            !off.settings.restoration_enabled(),
            "no restoration without saves"
        );
    }

    #[test]
    fn invalid_values_name_the_option_value_and_choices() {
        let err = resolve("[settings]\ntranscript-auto-save = 7\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value 7 for option `settings.transcript-auto-save`: expected one of \"0\", \"1\", \"2\""
        );
        let err = resolve("[settings]\nsession-restoration-mode = \"fancy\"\n").unwrap_err();
        assert!(err.to_string().contains("\"simple\", \"none\""), "{err}");
        assert_eq!(
            invalid_option(resolve(
                "[settings]\ntranscript-save-on-error = \"ignore\"\n"
            )),
            "settings.transcript-save-on-error"
        );
        assert_eq!(
            invalid_option(resolve("[settings]\ntranscript-resend-delay = \"soon\"\n")),
            "settings.transcript-resend-delay"
        );
        assert_eq!(
            invalid_option(resolve("[settings]\ntranscript-resend-attempts = -1\n")),
            "settings.transcript-resend-attempts"
        );
        assert_eq!(
            invalid_option(resolve("[settings]\ntranscript-save-notices = \"yes\"\n")),
            "settings.transcript-save-notices"
        );
        assert_eq!(
            invalid_option(resolve("[cassandra]\nread-consistency = \"MOST\"\n")),
            "cassandra.read-consistency"
        );
        assert_eq!(
            invalid_option(resolve("[cassandra]\nkeyspace = \"no-dashes\"\n")),
            "cassandra.keyspace"
        );
        assert_eq!(
            invalid_option(resolve("[server]\nlisten = \"localhost\"\n")),
            "server.listen"
        );
        assert_eq!(
            invalid_option(resolve("[server]\nsqlite-synchronous = \"sometimes\"\n")),
            "server.sqlite-synchronous"
        );
    }

    #[test]
    fn unknown_options_are_refused() {
        assert_eq!(
            resolve("[settings]\ntranscript-autosave = 1\n").unwrap_err(),
            ConfigError::Unknown("settings.transcript-autosave".into())
        );
    }

    #[test]
    fn environment_overrides_file_and_flags_override_environment() {
        let layers = Layers::from_toml("[settings]\ntranscript-auto-save = 1\n")
            .unwrap()
            .with_env([
                (
                    "CONFAB_SETTINGS_TRANSCRIPT_AUTO_SAVE".to_string(),
                    "2".to_string(),
                ),
                (
                    "CONFAB_CASSANDRA_CONTACT_POINTS".to_string(),
                    "10.0.0.1:9042, 10.0.0.2:9042".to_string(),
                ),
                (
                    "CONFAB_CASSANDRA_WRITE_CONSISTENCY".to_string(),
                    "local_quorum".to_string(),
                ),
            ]);
        let c = layers.resolve().unwrap();
        assert_eq!(c.settings.transcript_auto_save, AutoSave::SaveAndNotify);
        assert_eq!(
            c.cassandra.contact_points,
            vec!["10.0.0.1:9042", "10.0.0.2:9042"]
        );
        assert_eq!(c.cassandra.write_consistency, Consistency::LocalQuorum);
        let c = layers
            .with_overrides(["settings.transcript-auto-save=0"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.settings.transcript_auto_save, AutoSave::Off);
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = Layers::default()
            .with("cassandra.password-file", file.display().to_string())
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.cassandra.password.as_deref(), Some("s3cret"));
        let missing = Layers::default()
            .with("cassandra.password-file", "/nonexistent/pw")
            .unwrap()
            .resolve();
        assert_eq!(invalid_option(missing), "cassandra.password-file");
    }

    #[test]
    fn every_option_survives_a_round_trip_through_to_toml() {
        // Every option set to a value other than its default, so that an
        // option missing from `to_toml` (or written wrongly) shows.
        let c = resolve(
            r#"[settings]
session-restoration-mode = "none"
transcript-auto-save = 2
transcript-save-on-error = "continue"
transcript-resend-attempts = 7
transcript-resend-delay = "1m 250ms"
transcript-save-notices = false
[cassandra]
contact-points = ["10.0.0.1:9042", "10.0.0.2:9042"]
keyspace = "other"
local-dc = "dc2"
read-consistency = "LOCAL_ONE"
write-consistency = "EACH_QUORUM"
username = "u"
password = "p\"w"
tls-ca-file = "/etc/ca.pem"
reconnect-timeout = "9s"
await-schema-agreement = false
[server]
instance-id = "chat-9"
listen = "0.0.0.0:7100"
store = "cassandra"
sqlite-path = "/var/lib/confab/x.db"
sqlite-synchronous = "extra"
sqlite-busy-timeout = "750ms"
contact-store = "sqlite"
contact-store-path = "/var/lib/confab/contacts.db"
advertise-url = "http://chat-9.internal:7100"
admin-token = "adm"
admin-kill-enabled = true
max-batch = 64
waiting-timeout = "90s"
max-transcript-events = 500
max-transcript-bytes = 100000
[gateway]
listen = "0.0.0.0:8443"
instances = ["http://a:7001"]
discover = true
token-secret = "ts"
agent-credential = "ag"
allowed-origins = ["https://shop.example"]
rate-limit-per-second = 5
rate-limit-burst = 6
health-interval = "1s"
instance-channel = false
max-sockets-per-participant = 3
ws-ping-interval = "7s"
token-ttl = "2h"
agents-file = "/etc/confab/agents"
agents-read-closed-chats = false
trusted-proxies = ["10.0.0.0/8", "::1/128"]
[cluster]
secret = "cs"
[dashboard]
listen = "0.0.0.0:9090"
instances = ["http://a:7001", "http://b:7002"]
gateways = ["http://g:8080"]
supervisor = "http://127.0.0.1:9999"
admin-token = "dash"
session-ttl = "1h"
instance-timeout = "2s"
agent-credential = "agent"
state-dir = "/var/lib/confab/dashboard"
[http]
header-timeout = "5s"
body-timeout = "20s"
max-connections-per-address = 64
tls-cert-file = "/etc/confab/cert.pem"
tls-key-file = "/etc/confab/key.pem"
tls-ca-file = "/etc/confab/ca.pem"
"#,
        )
        .unwrap();
        let all = [
            Section::Settings,
            Section::Cassandra,
            Section::Server,
            Section::Gateway,
            Section::Cluster,
            Section::Dashboard,
            Section::Http,
        ];
        let written = c.to_toml(&all);
        assert_eq!(resolve(&written).unwrap(), c, "{written}");
        for o in OPTIONS {
            if o.name.ends_with("-file") && !o.name.starts_with("tls-") {
                continue; // a secret's file variant: the value is written
            }
            assert!(
                written.contains(&format!("{} = ", o.name)),
                "{}.{} not written:\n{written}",
                o.section,
                o.name
            );
        }
        assert_eq!(
            resolve(&resolve("").unwrap().to_toml(&all)).unwrap(),
            resolve("").unwrap()
        );
        let gateway_only = c.to_toml(&[Section::Gateway]);
        assert!(!gateway_only.contains("[server]") && !gateway_only.contains("\"adm\""));
    }

    #[test]
    fn every_default_in_the_table_is_a_valid_value() {
        // An empty configuration resolves from the table's defaults alone,
        // and each default, given explicitly, resolves to the same.
        let defaults = resolve("").unwrap();
        assert_eq!(resolve(&defaults_toml()).unwrap(), defaults);
    }

    #[test]
    fn the_readme_configuration_block_is_the_option_table() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let marker = "<!-- generated by `confab config defaults`; a test checks it -->\n```toml\n";
        let start = readme
            .find(marker)
            .expect("the README's configuration block marker")
            + marker.len();
        let end = start + readme[start..].find("```").expect("end of the block");
        assert_eq!(
            &readme[start..end],
            defaults_toml(),
            "README.md's configuration block differs from config::OPTIONS; paste the output of `confab config defaults`"
        );
    }
}
