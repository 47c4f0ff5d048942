//! Logs, numbered events and metrics. Metric names live in [`metrics`] and
//! event numbers in [`events`], so that the README's catalog, the Grafana
//! dashboards and the alert rules have one source to match.

pub mod events;
pub mod metrics;
pub mod recent;

use std::io::IsTerminal;
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The value of `--log-format`.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Install the global subscriber. `RUST_LOG` overrides the default filter.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hyper=warn,tower_http=warn,kassandra=off"));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(recent::RecentEvents);
    let result = match format {
        // Colours only on a terminal, never into a log file or a pipe.
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(std::io::stdout().is_terminal()),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
    // A second init (tests building several applications) keeps the first.
    let _ = result;
}
