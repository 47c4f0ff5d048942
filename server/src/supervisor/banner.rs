//! What `confab up` prints once every component serves: where to go, the
//! credentials, and which process is which.

use super::children::Supervisor;
use super::plan::Kind;

pub fn print(sup: &Supervisor) {
    let plan = &sup.plan;
    let dir = plan.data_dir.display();
    println!();
    println!(
        "confab cluster is up ({} instances, {} store)",
        plan.instances().count(),
        plan.store().name()
    );
    println!();
    println!("  customer chat page   {}/", plan.gateway_url);
    println!("  agent page           {}/agent", plan.gateway_url);
    println!(
        "  public API           {}/api/v1  (OpenAPI: /api/v1/openapi.json)",
        plan.gateway_url
    );
    println!(
        "  dashboard            {}  (sign in with the admin token below)",
        plan.dashboard_url
    );
    println!("  supervisor API       {}", plan.supervisor_url());
    if let Some(p) = plan.components.iter().find(|c| c.kind == Kind::Prometheus) {
        println!("  Prometheus           {}", p.url);
    }
    println!("  Prometheus config    {dir}/prometheus.yml");
    println!("  admin token          {}", plan.admin_token);
    println!("  agent credential     {}", plan.agent_credential);
    println!();
    for p in sup.infos() {
        let pid = p.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        println!("  {:<10} {:<24} pid {pid}", p.id, p.url);
    }
    println!();
    println!("  data       {dir}");
    println!("  logs       {dir}/logs/<component>.log");
    println!("  cluster    {dir}/cluster.json");
    println!();
    println!("Ctrl-C stops everything.");
}
