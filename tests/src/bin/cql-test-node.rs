//! Serve the CQL test node (the kassandra crate, in memory, NOT a real
//! Cassandra) for trying `confab up --store cassandra` without a cluster:
//!
//!     cargo run -p confab-e2e --bin cql-test-node -- --listen 127.0.0.1:9042

use clap::Parser;
use confab_e2e::cql_node::TestNode;
use std::net::SocketAddr;

#[derive(Parser)]
#[command(about = "An in-memory CQL test node (kassandra); not a real Cassandra")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9042")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let node = match TestNode::start_on(args.listen).await {
        Ok(node) => node,
        Err(e) => {
            eprintln!(
                "error: cannot serve the CQL test node on {}: {e}",
                args.listen
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "CQL test node (kassandra, in memory, NOT a real Cassandra) on {}; \
         use --set cassandra.await-schema-agreement=false --set cassandra.local-dc= with it",
        node.addr
    );
    confab::process::shutdown_signal().await;
    std::process::ExitCode::SUCCESS
}
