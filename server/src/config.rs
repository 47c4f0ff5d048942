//! Layered configuration: TOML file, then `CONFAB_<SECTION>_<OPTION>`
//! environment variables, then `--set section.option=value` flags. Raw values
//! become typed values once, here, and an invalid value stops start-up with
//! an error naming the option, the value and the valid choices.
//!
//! Option names follow the reference chat server (`[settings]`,
//! `[cassandra]`) so that its operators recognise them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreBackend {
    Sqlite,
    Cassandra,
}

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
    /// Where final transcripts go; defaults to the session store's file.
    pub contact_store_path: Option<PathBuf>,
    pub admin_token: Option<String>,
    /// `POST /admin/kill` (SIGKILL itself, for restoration tests outside
    /// `confab up`); off unless turned on.
    pub admin_kill_enabled: bool,
    /// Most group-committed operations in one store transaction.
    pub max_batch: usize,
}

/// `[gateway]`: the public chat API.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub instances: Vec<String>,
    pub token_secret: Option<String>,
    pub agent_credential: Option<String>,
    pub allowed_origins: Vec<String>,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    pub health_interval: Duration,
    /// Reach the instances over one multiplexed channel each (crate::rpc);
    /// false: one HTTP/1.1 request per call.
    pub instance_channel: bool,
    pub admin_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub settings: Settings,
    pub cassandra: CassandraConfig,
    pub server: ServerConfig,
    pub gateway: GatewayConfig,
}

/// Every option: (section, name). Environment variables and unknown-key
/// checks are derived from this list.
pub const OPTIONS: &[(&str, &str)] = &[
    ("settings", "session-restoration-mode"),
    ("settings", "transcript-auto-save"),
    ("settings", "transcript-save-on-error"),
    ("settings", "transcript-resend-attempts"),
    ("settings", "transcript-resend-delay"),
    ("settings", "transcript-save-notices"),
    ("cassandra", "contact-points"),
    ("cassandra", "keyspace"),
    ("cassandra", "local-dc"),
    ("cassandra", "read-consistency"),
    ("cassandra", "write-consistency"),
    ("cassandra", "username"),
    ("cassandra", "password"),
    ("cassandra", "password-file"),
    ("cassandra", "tls-ca-file"),
    ("cassandra", "reconnect-timeout"),
    ("cassandra", "await-schema-agreement"),
    ("server", "instance-id"),
    ("server", "listen"),
    ("server", "store"),
    ("server", "sqlite-path"),
    ("server", "sqlite-synchronous"),
    ("server", "sqlite-busy-timeout"),
    ("server", "contact-store-path"),
    ("server", "admin-token"),
    ("server", "admin-token-file"),
    ("server", "admin-kill-enabled"),
    ("server", "max-batch"),
    ("gateway", "listen"),
    ("gateway", "instances"),
    ("gateway", "token-secret"),
    ("gateway", "token-secret-file"),
    ("gateway", "agent-credential"),
    ("gateway", "allowed-origins"),
    ("gateway", "rate-limit-per-second"),
    ("gateway", "rate-limit-burst"),
    ("gateway", "health-interval"),
    ("gateway", "instance-channel"),
    ("gateway", "admin-token"),
    ("gateway", "admin-token-file"),
];

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
        if !OPTIONS.iter().any(|(s, o)| format!("{s}.{o}") == key) {
            return Err(ConfigError::Unknown(key.to_owned()));
        }
        self.values.insert(key.to_owned(), value);
        Ok(())
    }

    /// Overlay `CONFAB_…` variables from `env`.
    pub fn with_env(mut self, env: impl IntoIterator<Item = (String, String)>) -> Self {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for (section, option) in OPTIONS {
            if let Some(v) = env.get(&env_name(section, option)) {
                self.values
                    .insert(format!("{section}.{option}"), Value::String(v.clone()));
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

    fn raw(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
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

    fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.raw(key) {
            None => Ok(default.to_owned()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(Self::invalid(key, v, "a string")),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        let s = self.string(key, "")?;
        Ok(if s.is_empty() { None } else { Some(s) })
    }

    fn choice<T: Copy>(&self, key: &str, default: T, choices: &[(&str, T)]) -> Result<T> {
        let Some(v) = self.raw(key) else {
            return Ok(default);
        };
        let text = match v {
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
                Self::invalid(key, v, &format!("one of {}", names.join(", ")))
            })
    }

    fn integer(&self, key: &str, default: u64, min: u64, max: u64) -> Result<u64> {
        let expected = format!("an integer from {min} to {max}");
        let n = match self.raw(key) {
            None => return Ok(default),
            Some(v @ Value::Integer(i)) => {
                u64::try_from(*i).map_err(|_| Self::invalid(key, v, &expected))?
            }
            Some(v @ Value::String(s)) => s
                .trim()
                .parse()
                .map_err(|_| Self::invalid(key, v, &expected))?,
            Some(v) => return Err(Self::invalid(key, v, &expected)),
        };
        if n < min || n > max {
            return Err(Self::invalid(key, &Value::Integer(n as i64), &expected));
        }
        Ok(n)
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(v @ Value::String(s)) => match s.as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(Self::invalid(key, v, "true or false")),
            },
            Some(v) => Err(Self::invalid(key, v, "true or false")),
        }
    }

    fn duration(&self, key: &str, default: Duration) -> Result<Duration> {
        let expected = "a duration such as \"500ms\", \"1s\" or \"2m\"";
        match self.raw(key) {
            None => Ok(default),
            Some(v @ Value::String(s)) => {
                humantime::parse_duration(s.trim()).map_err(|_| Self::invalid(key, v, expected))
            }
            Some(v) => Err(Self::invalid(key, v, expected)),
        }
    }

    fn list(&self, key: &str, default: &[&str]) -> Result<Vec<String>> {
        match self.raw(key) {
            None => Ok(default.iter().map(|s| s.to_string()).collect()),
            Some(Value::String(s)) => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()),
            Some(v @ Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(Self::invalid(key, v, "a list of strings")),
                })
                .collect(),
            Some(v) => Err(Self::invalid(key, v, "a list of strings")),
        }
    }

    fn socket(&self, key: &str, default: &str) -> Result<SocketAddr> {
        let s = self.string(key, default)?;
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
                RestorationMode::Simple,
                &[
                    ("simple", RestorationMode::Simple),
                    ("none", RestorationMode::None),
                ],
            )?,
            transcript_auto_save: self.choice(
                "settings.transcript-auto-save",
                AutoSave::Save,
                &[
                    ("0", AutoSave::Off),
                    ("1", AutoSave::Save),
                    ("2", AutoSave::SaveAndNotify),
                ],
            )?,
            transcript_save_on_error: self.choice(
                "settings.transcript-save-on-error",
                SaveOnError::Close,
                &[
                    ("close", SaveOnError::Close),
                    ("continue", SaveOnError::Continue),
                ],
            )?,
            transcript_resend_attempts: self.integer(
                "settings.transcript-resend-attempts",
                3,
                0,
                100,
            )? as u32,
            transcript_resend_delay: self
                .duration("settings.transcript-resend-delay", Duration::from_secs(1))?,
            transcript_save_notices: self.boolean("settings.transcript-save-notices", true)?,
        };
        let consistency = |key: &str| -> Result<Consistency> {
            let s = self.string(key, "QUORUM")?;
            Consistency::parse(&s)
                .ok_or_else(|| Self::invalid(key, &Value::String(s), Consistency::CHOICES))
        };
        let cassandra = CassandraConfig {
            contact_points: self.list("cassandra.contact-points", &["127.0.0.1:9042"])?,
            keyspace: self.string("cassandra.keyspace", "confab")?,
            local_dc: self.string("cassandra.local-dc", "datacenter1")?,
            read_consistency: consistency("cassandra.read-consistency")?,
            write_consistency: consistency("cassandra.write-consistency")?,
            username: self.string("cassandra.username", "")?,
            password: self.secret("cassandra.password")?,
            tls_ca_file: self.opt_string("cassandra.tls-ca-file")?.map(PathBuf::from),
            reconnect_timeout: self
                .duration("cassandra.reconnect-timeout", Duration::from_secs(5))?,
            await_schema_agreement: self.boolean("cassandra.await-schema-agreement", true)?,
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
        let listen = self.socket("server.listen", "127.0.0.1:7001")?;
        let server = ServerConfig {
            instance_id: self.string("server.instance-id", &format!("confab-{}", listen.port()))?,
            listen,
            store: self.choice(
                "server.store",
                StoreBackend::Sqlite,
                &[
                    ("sqlite", StoreBackend::Sqlite),
                    ("cassandra", StoreBackend::Cassandra),
                ],
            )?,
            sqlite_path: PathBuf::from(self.string("server.sqlite-path", ".confab/confab.db")?),
            sqlite_synchronous: self.choice(
                "server.sqlite-synchronous",
                Synchronous::Full,
                &[
                    ("off", Synchronous::Off),
                    ("normal", Synchronous::Normal),
                    ("full", Synchronous::Full),
                    ("extra", Synchronous::Extra),
                ],
            )?,
            sqlite_busy_timeout: self
                .duration("server.sqlite-busy-timeout", Duration::from_secs(5))?,
            contact_store_path: self
                .opt_string("server.contact-store-path")?
                .map(PathBuf::from),
            admin_token: self.secret("server.admin-token")?,
            admin_kill_enabled: self.boolean("server.admin-kill-enabled", false)?,
            max_batch: self.integer("server.max-batch", 512, 1, 100_000)? as usize,
        };
        if server.instance_id.is_empty()
            || !server
                .instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(Self::invalid(
                "server.instance-id",
                &Value::String(server.instance_id.clone()),
                "letters, digits, '-', '_' or '.'",
            ));
        }
        let gateway = GatewayConfig {
            listen: self.socket("gateway.listen", "127.0.0.1:8080")?,
            instances: self.list("gateway.instances", &[])?,
            token_secret: self.secret("gateway.token-secret")?,
            agent_credential: self.opt_string("gateway.agent-credential")?,
            allowed_origins: self.list("gateway.allowed-origins", &[])?,
            rate_limit_per_second: self.integer(
                "gateway.rate-limit-per-second",
                20,
                1,
                1_000_000,
            )? as u32,
            rate_limit_burst: self.integer("gateway.rate-limit-burst", 40, 1, 1_000_000)? as u32,
            health_interval: self
                .duration("gateway.health-interval", Duration::from_millis(250))?,
            instance_channel: self.boolean("gateway.instance-channel", true)?,
            admin_token: self.secret("gateway.admin-token")?,
        };
        Ok(Config {
            settings,
            cassandra,
            server,
            gateway,
        })
    }
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
        let dir = std::env::temp_dir().join(format!("confab-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
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
}
