//! `confab-bench`: the load generator. It starts real `confab` processes
//! (built with the same profile as itself) on loopback ports picked like
//! the tests pick them, and reports figures as ratios against baselines
//! measured in the same run.
//!
//!     cargo run --release -p confab-bench -- --duration 10s

mod scenarios;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = scenarios::BenchArgs::parse();
    match scenarios::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
