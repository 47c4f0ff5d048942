//! confab: a highly available chat server for web chat between customers
//! and contact-centre agents. The `confab` binary is a thin wrapper over
//! this library: each subcommand builds one application from it
//! (`instance::Application`, `gateway::Application`, `supervisor::run`).

pub mod auth;
pub mod channel;
pub mod cli;
pub mod config;
pub mod contract;
pub mod dashboard;
pub mod error;
pub mod gateway;
pub mod instance;
pub mod keyed_lock;
pub mod listener;
pub mod process;
pub mod session;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod ws;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
