//! The `confab` command line. Each subcommand loads its configuration
//! (file, environment, flags), sets up telemetry and runs one application.

use crate::config::{Config, ConfigError, Layers};
use crate::telemetry::{self, LogFormat};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "confab", version, about = "A highly available chat server")]
pub struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CONFAB_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one chat server instance.
    Server(ServerArgs),
    /// Run the public chat gateway in front of instances.
    Gateway(GatewayArgs),
    /// Run the operator dashboard.
    Dashboard(DashboardArgs),
    /// Start a local cluster: instances, gateway and dashboard.
    Up(crate::supervisor::UpArgs),
    /// Cassandra schema management.
    Cassandra {
        #[command(subcommand)]
        command: CassandraCommand,
    },
    /// The configuration: every option with its default, or a check of a
    /// configuration without starting anything.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Per-agent secrets (`gateway.agents-file`).
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum AgentsCommand {
    /// Make a secret for a new agent, append its hash to the agents file
    /// and print the secret (once: the file keeps only its hash).
    Add {
        /// The agent's id (letters, digits, '-', '_', '.', '@').
        id: String,
        /// The agents file (made 0600 if new).
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove an agent's line: within a second or two every gateway reading
    /// the file refuses their secret and their chat tokens, and closes their
    /// open WebSockets at the next ping.
    Revoke {
        id: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// The agent ids the file lists.
    List {
        #[arg(long)]
        file: PathBuf,
    },
}

/// Options every component takes: a TOML file and `section.option=value`
/// overrides (which win over the file and the environment).
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "CONFAB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one option, e.g. `--set settings.transcript-auto-save=2`.
    #[arg(long = "set", value_name = "SECTION.OPTION=VALUE")]
    pub overrides: Vec<String>,
}

impl ConfigArgs {
    /// File, then `CONFAB_…` environment, then `--set`, then typed flags.
    pub fn load(&self, flags: &[(&str, Option<String>)]) -> Result<Config, ConfigError> {
        let mut layers = match &self.config {
            Some(path) => Layers::from_file(path)?,
            None => Layers::default(),
        };
        layers = layers.with_env(std::env::vars());
        layers = layers.with_overrides(self.overrides.iter().map(String::as_str))?;
        for (key, value) in flags {
            if let Some(v) = value {
                layers = layers.with(key, v.clone())?;
            }
        }
        layers.resolve()
    }
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Address to listen on (server.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// This instance's id (server.instance-id).
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Session store backend: sqlite or cassandra (server.store).
    #[arg(long)]
    pub store: Option<String>,
    /// SQLite session store file (server.sqlite-path).
    #[arg(long)]
    pub sqlite_path: Option<PathBuf>,
    /// Admin token for /admin (server.admin-token).
    #[arg(long, env = "CONFAB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum CassandraCommand {
    /// Create the keyspace (single-node replication if it does not exist
    /// yet) and the tables, from the scripts in `cassandra/`.
    Init {
        #[command(flatten)]
        config: ConfigArgs,
        /// Contact points HOST:PORT,… (cassandra.contact-points).
        #[arg(long)]
        contact_points: Option<String>,
        /// Use the TTL variant of the tables (self-cleaning records).
        #[arg(long)]
        ttl: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print every option with its default and what it does (TOML).
    Defaults,
    /// Resolve a configuration (file, environment, `--set`) and say whether
    /// it is valid, without starting anything.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Address to listen on (gateway.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Instance base URLs, comma-separated or repeated (gateway.instances).
    #[arg(long = "instance", value_delimiter = ',')]
    pub instances: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Address to listen on (dashboard.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Instance base URLs, comma-separated or repeated (dashboard.instances).
    #[arg(long = "instance", value_delimiter = ',')]
    pub instances: Vec<String>,
    /// Gateway base URLs, comma-separated or repeated (dashboard.gateways).
    #[arg(long = "gateway", value_delimiter = ',')]
    pub gateways: Vec<String>,
    /// A `confab up` supervisor's URL (dashboard.supervisor).
    #[arg(long)]
    pub supervisor: Option<String>,
    /// The admin token operators sign in with (dashboard.admin-token).
    #[arg(long, env = "CONFAB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl DashboardArgs {
    /// The typed flags as the options they set.
    fn flags(&self) -> Vec<(&'static str, Option<String>)> {
        let list = |v: &Vec<String>| (!v.is_empty()).then(|| v.join(","));
        vec![
            ("dashboard.listen", self.listen.clone()),
            ("dashboard.instances", list(&self.instances)),
            ("dashboard.gateways", list(&self.gateways)),
            ("dashboard.supervisor", self.supervisor.clone()),
            ("dashboard.admin-token", self.admin_token.clone()),
        ]
    }
}

impl ServerArgs {
    /// The typed flags as the options they set.
    fn flags(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("server.listen", self.listen.clone()),
            ("server.instance-id", self.instance_id.clone()),
            ("server.store", self.store.clone()),
            (
                "server.sqlite-path",
                self.sqlite_path.as_ref().map(|p| p.display().to_string()),
            ),
            ("server.admin-token", self.admin_token.clone()),
        ]
    }
}

impl GatewayArgs {
    /// The typed flags as the options they set.
    fn flags(&self) -> Vec<(&'static str, Option<String>)> {
        let instances = (!self.instances.is_empty()).then(|| self.instances.join(","));
        vec![
            ("gateway.listen", self.listen.clone()),
            ("gateway.instances", instances),
        ]
    }
}

pub fn main() -> ExitCode {
    crate::tls::install_default_provider();
    let cli = Cli::parse();
    let log_format = cli.log_format;
    telemetry::init_logging(log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: as a JSON log line where logs are parsed, else as text.
            match log_format {
                LogFormat::Json => tracing::error!("{e:#}"),
                LogFormat::Text => eprintln!("error: {e:#}"),
            }
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(args) => {
            let config = args.config.load(&args.flags())?;
            crate::process::raise_and_log_descriptor_limit();
            let app = crate::instance::Application::build(&config).await?;
            app.run_until_stopped(crate::process::shutdown_signal())
                .await
        }
        Command::Gateway(args) => {
            let config = args.config.load(&args.flags())?;
            crate::process::raise_and_log_descriptor_limit();
            let app = crate::gateway::Application::build(&config).await?;
            app.run_until_stopped(crate::process::shutdown_signal())
                .await
        }
        Command::Dashboard(args) => {
            let config = args.config.load(&args.flags())?;
            crate::process::raise_and_log_descriptor_limit();
            let app = crate::dashboard::Application::build(&config).await?;
            app.run_until_stopped(crate::process::shutdown_signal())
                .await
        }
        Command::Up(args) => crate::supervisor::run(args).await,
        Command::Cassandra {
            command:
                CassandraCommand::Init {
                    config,
                    contact_points,
                    ttl,
                },
        } => {
            let config = config.load(&[("cassandra.contact-points", contact_points)])?;
            let c = &config.cassandra;
            crate::store::cassandra::connect_and_init(c, ttl).await?;
            println!(
                "keyspace {} ready at {} ({} tables)",
                c.keyspace,
                c.contact_points.join(","),
                if ttl { "TTL" } else { "plain" }
            );
            Ok(())
        }
        Command::Agents {
            command: AgentsCommand::Add { id, file },
        } => {
            let secret = crate::gateway::agents::add(&file, &id)?;
            println!("{secret}");
            eprintln!(
                "agent {id} added to {}; hand them the secret above (it is not kept)",
                file.display()
            );
            Ok(())
        }
        Command::Agents {
            command: AgentsCommand::Revoke { id, file },
        } => {
            crate::gateway::agents::revoke(&file, &id)?;
            eprintln!("agent {id} removed from {}", file.display());
            Ok(())
        }
        Command::Agents {
            command: AgentsCommand::List { file },
        } => {
            for id in crate::gateway::agents::list(&file)? {
                println!("{id}");
            }
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{}", crate::config::defaults_toml());
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            config.load(&[])?;
            println!("configuration is valid");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_typed_flag_sets_a_known_option() {
        let server = Cli::parse_from([
            "confab",
            "server",
            "--listen",
            "127.0.0.1:1",
            "--instance-id",
            "a",
            "--store",
            "sqlite",
            "--sqlite-path",
            "/tmp/x.db",
            "--admin-token",
            "t",
        ]);
        let gateway = Cli::parse_from([
            "confab",
            "gateway",
            "--listen",
            "127.0.0.1:2",
            "--instance",
            "http://a",
        ]);
        let dashboard = Cli::parse_from([
            "confab",
            "dashboard",
            "--listen",
            "127.0.0.1:3",
            "--instance",
            "http://a",
            "--gateway",
            "http://g",
            "--supervisor",
            "http://s",
            "--admin-token",
            "t",
        ]);
        let flags = match (server.command, gateway.command, dashboard.command) {
            (Command::Server(s), Command::Gateway(g), Command::Dashboard(d)) => {
                [s.flags(), g.flags(), d.flags()].concat()
            }
            _ => unreachable!(),
        };
        for (key, value) in flags {
            assert!(crate::config::option(key).is_some(), "{key} is no option");
            assert!(value.is_some(), "{key} was given");
        }
    }
}
