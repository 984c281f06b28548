//! The kubectl plugin verbs (`kubectl cutover status|approve|abort|rollback|report NAME`, the
//! same binary installed as `kubectl-cutover`). Each request is a change to the resource that
//! the operator reconciles — never a side channel to the operator or the databases.

use anyhow::{Context as _, bail};
use cutover_operator::api::{DatabaseCutover, Phase};
use cutover_operator::plan;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// Which cutover.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// The DatabaseCutover's name.
    pub name: String,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    pub namespace: Option<String>,
}

/// A plugin verb.
#[derive(Debug, Clone, Copy)]
pub enum Verb {
    /// Show phase, step, conditions, replication and verification.
    Status,
    /// Pass the point of no return (manual approval).
    Approve,
    /// Stop before the point of no return.
    Abort,
    /// Move the application back to the source during hypercare.
    Rollback,
    /// Per-step durations and the write-freeze window.
    Report,
}

async fn api_for(target: &Target) -> anyhow::Result<Api<DatabaseCutover>> {
    let config = kube::Config::infer()
        .await
        .context("failed to find a kubeconfig or an in-cluster service account")?;
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("failed to build a Kubernetes client")?;
    Ok(Api::namespaced(client, &namespace))
}

/// Runs a verb.
pub async fn run(verb: Verb, target: Target) -> anyhow::Result<()> {
    let api = api_for(&target).await?;
    let obj = api
        .get(&target.name)
        .await
        .with_context(|| format!("failed to read DatabaseCutover {}", target.name))?;
    let status = obj.status.clone().unwrap_or_default();
    let patch = |body: serde_json::Value| {
        let api = api.clone();
        let name = target.name.clone();
        async move {
            api.patch(
                &name,
                &PatchParams::apply("kubectl-cutover"),
                &Patch::Merge(&body),
            )
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) => anyhow::anyhow!("the API server refused: {}", s.message),
                other => anyhow::anyhow!("failed to update {name}: {other}"),
            })
        }
    };
    match verb {
        Verb::Status => print!("{}", render_status(&obj)),
        Verb::Report => print!(
            "{}",
            plan::timing_report(&status, jiff::Timestamp::now()).render()
        ),
        Verb::Approve => {
            if status.phase.is_terminal() || status.phase.is_past_point_of_no_return() {
                bail!(
                    "{} is {}: there is nothing to approve",
                    target.name,
                    status.phase
                );
            }
            patch(json!({"spec": {"pointOfNoReturn": {"approved": true}}})).await?;
            println!(
                "approved {}: the operator passes the point of no return once verification matched{}",
                target.name,
                if status.phase == Phase::AwaitingApproval {
                    " (it has)"
                } else {
                    ""
                }
            );
        }
        Verb::Abort => {
            if status.phase.is_past_point_of_no_return() {
                bail!(
                    "{} is {}, past the point of no return: an abort is no longer possible; use `kubectl cutover rollback {}`",
                    target.name,
                    status.phase,
                    target.name
                );
            }
            if status.phase.is_terminal() {
                bail!("{} already ended ({})", target.name, status.phase);
            }
            patch(json!({"spec": {"abort": true}})).await?;
            println!(
                "abort requested for {}: the source is unfrozen and replication removed",
                target.name
            );
        }
        Verb::Rollback => {
            if status.phase != Phase::Hypercare {
                bail!(
                    "{} is {}: a rollback is possible during Hypercare only",
                    target.name,
                    status.phase
                );
            }
            patch(json!({"spec": {"rollback": {"requested": true}}})).await?;
            println!(
                "rollback requested for {}: the application moves back to the source",
                target.name
            );
        }
    }
    Ok(())
}

fn render_status(obj: &DatabaseCutover) -> String {
    let status = obj.status.clone().unwrap_or_default();
    let mut out = format!(
        "{} ({:?}): {}\n",
        obj.metadata.name.as_deref().unwrap_or("?"),
        obj.spec.mode,
        status.phase
    );
    if let Some(step) = &status.current_step {
        out.push_str(&format!("step: {step}\n"));
    }
    for c in &status.conditions {
        out.push_str(&format!(
            "{}={} ({}): {}\n",
            c.type_, c.status, c.reason, c.message
        ));
    }
    if let Some(v) = &status.server_versions {
        out.push_str(&format!("{}\n", super::local::versions_line(v)));
    }
    for c in status
        .preflight
        .iter()
        .filter(|c| c.outcome != cutover_operator::api::CheckOutcome::Pass)
    {
        out.push_str(&format!(
            "preflight {:?} {}: {}\n",
            c.outcome, c.name, c.message
        ));
    }
    if let Some(r) = &status.replication {
        out.push_str(&format!(
            "replication: {}/{} tables ready, lag {}\n",
            r.tables_ready,
            r.tables_total,
            r.lag.as_deref().unwrap_or("?")
        ));
        if let Some(c) = &r.initial_copy {
            out.push_str(&format!("{}\n", super::local::copy_line(c)));
        }
    }
    if let Some(o) = &status.online_verification {
        out.push_str(&format!("{}\n", super::local::online_line(o)));
        if let Some(d) = &o.divergence {
            out.push_str(&format!("divergence: {d}\n"));
        }
    }
    if let Some(v) = &status.verification {
        out.push_str(&format!(
            "verification: {} ({} rows compared{})\n",
            if v.matched { "matched" } else { "DIFFERENCES" },
            v.rows_compared,
            match (&v.method, v.keys_in_freeze) {
                (Some(m), Some(k)) => format!(", {m}: {k} changed keys compared inside the freeze"),
                (Some(m), None) => format!(", {m}"),
                _ => String::new(),
            }
        ));
        if let Some(why) = &v.fallback_reason {
            out.push_str(&format!(
                "verified every row inside the freeze because {why}\n"
            ));
        }
    }
    if let Some(at) = &status.point_of_no_return_at {
        out.push_str(&format!("point of no return passed at {at}\n"));
    }
    if let Some(m) = &status.message {
        out.push_str(&format!("message: {m}\n"));
    }
    out
}
