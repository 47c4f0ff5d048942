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
    /// Start a local cluster: instances, gateway and dashboard.
    Up(crate::cluster::UpArgs),
    /// Cassandra schema management.
    Cassandra {
        #[command(subcommand)]
        command: CassandraCommand,
    },
    /// Load-generate against a real instance and report figures against
    /// the raw store rate measured in the same run.
    Bench(crate::bench::BenchArgs),
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
    /// Serve an in-memory CQL test node (the kassandra crate) for trying
    /// `confab up --store cassandra` without a cluster. Not a real
    /// Cassandra: no replication, no TTL, data lost on exit.
    TestNode {
        #[arg(long, default_value = "127.0.0.1:9042")]
        listen: std::net::SocketAddr,
    },
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
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
            eprintln!("error: {e:#}");
            tracing::error!("{e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(args) => {
            let config = args.config.load(&[
                ("server.listen", args.listen.clone()),
                ("server.instance-id", args.instance_id.clone()),
                ("server.store", args.store.clone()),
                (
                    "server.sqlite-path",
                    args.sqlite_path.as_ref().map(|p| p.display().to_string()),
                ),
                ("server.admin-token", args.admin_token.clone()),
            ])?;
            let app = crate::instance::Application::build(&config).await?;
            app.run_until_stopped(crate::instance::shutdown_signal())
                .await
        }
        Command::Gateway(args) => {
            let instances = (!args.instances.is_empty()).then(|| args.instances.join(","));
            let config = args.config.load(&[
                ("gateway.listen", args.listen.clone()),
                ("gateway.instances", instances),
            ])?;
            let app = crate::gateway::Application::build(&config).await?;
            app.run_until_stopped(crate::instance::shutdown_signal())
                .await
        }
        Command::Up(args) => crate::cluster::run(args).await,
        Command::Cassandra {
            command: CassandraCommand::TestNode { listen },
        } => {
            let node = crate::store::test_node::TestNode::start_on(listen).await?;
            println!(
                "CQL test node (kassandra, in memory, NOT a real Cassandra) on {}; \
                 use --set cassandra.await-schema-agreement=false --set cassandra.local-dc= with it",
                node.addr
            );
            crate::instance::shutdown_signal().await;
            Ok(())
        }
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
            let session = crate::store::cassandra::connect(c).await?;
            crate::store::cassandra::init_schema(&session, &c.keyspace, ttl).await?;
            println!(
                "keyspace {} ready at {} ({} tables)",
                c.keyspace,
                c.contact_points.join(","),
                if ttl { "TTL" } else { "plain" }
            );
            Ok(())
        }
        Command::Bench(args) => crate::bench::run(args).await,
    }
}
