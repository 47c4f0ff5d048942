//! `confab up`: a local HA cluster in one command. N instances (separate
//! processes, so that kill -9 is real), the gateway and the dashboard, on
//! one SQLite file under `--data-dir`, supervised: a dead instance stays
//! dead until asked (so a kill -9 test sees the failover), Ctrl-C or SIGTERM
//! stops everything.
//!
//! It tells the truth: an invalid option, a busy port or a data directory
//! in use stops it before anything starts; a component that exits or does
//! not come up stops it with that component's own last log lines and a
//! non-zero exit; the banner appears only once every component serves its
//! port as the process `up` started.
//!
//! - [`plan`]: what to start, decided and checked up front.
//! - [`children`]: the supervised processes and `cluster.json`.
//! - [`api`]: the supervisor API.
//! - [`banner`]: what is printed once the cluster is up.
//! - [`data_dir`]: the directory's lock and private files.

mod api;
mod banner;
mod children;
pub mod data_dir;
mod plan;

pub use plan::UpArgs;

use anyhow::Context;
use children::Supervisor;
use plan::Plan;

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let (data_dir, _lock) = data_dir::lock(&args.data_dir)?;
    let plan = Plan::new(args, data_dir)?;
    plan.check_ports_free()?;
    crate::tls::install_client(&plan.config.http)?;
    let listener =
        crate::listener::Listener::bind("supervisor", plan.supervisor_addr, &plan.config.http)
            .await
            .with_context(|| format!("the supervisor API on {}", plan.supervisor_addr))?;
    if plan.store() == crate::config::StoreBackend::Cassandra {
        let c = &plan.config.cassandra;
        crate::store::cassandra::connect_and_init(c, false).await?;
        println!(
            "Cassandra keyspace {} ready at {}",
            c.keyspace,
            c.contact_points.join(",")
        );
    }
    // Whatever the components create here (the database, its WAL, logs)
    // is readable by this user only.
    // SAFETY: umask(2) only sets the process's file-mode mask.
    unsafe {
        libc::umask(0o077);
    }
    let sup = Supervisor::new(plan);
    if let Err(e) = sup.start_all().await {
        sup.stop_all().await;
        return Err(anyhow::Error::new(e).context("the cluster did not start"));
    }
    banner::print(&sup);
    let stopping = sup.clone();
    listener
        .serve(api::router(sup.clone()), async move {
            crate::process::shutdown_signal().await;
            println!("stopping the cluster…");
            stopping.stop_all().await;
        })
        .await?;
    println!("cluster stopped");
    Ok(())
}
