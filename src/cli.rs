//! Command-line interface. Exit codes: 0 success, 1 the work failed (demo found
//! leftovers, a run ended in error), 2 bad usage or configuration, 3 a service
//! (database, broker) could not be reached.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppError};
use crate::config::Settings;
use crate::ops_cli::PlanFormat;

#[derive(Parser, Debug)]
#[command(
    name = "reaper",
    version,
    about = "Tears down what deleted or half-provisioned things left behind, in dependency order."
)]
pub struct Cli {
    /// TOML config merged over the defaults (config/default.toml); REAPER_* env vars win over both.
    #[arg(long, short, global = true, env = "REAPER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the worker: consume events, tear down, publish results. Stops on SIGTERM/Ctrl-C.
    Run,
    /// Apply the ledger's migrations to the configured database and exit.
    Migrate,
    /// Check the config and print the teardown order of the kinds.
    CheckConfig {
        /// Also connect to the broker, the ledger and every provider (declaring
        /// and deleting nothing) and say which answer, and why not; exit 3 if any does not.
        #[arg(long)]
        connect: bool,
    },
    /// Serve the simulated cloud (for trying reaper without a real API).
    ///
    /// Resources live at any path: `PUT /v1/vnis/v1` with
    /// `{"depends_on": ["/v1/servers/s1"], "attributes": {...}}` creates one;
    /// `GET` answers 200 or 404 (on a collection, a page of its children:
    /// `?start=ID&limit=N`); `DELETE` answers 204, 404 when missing, 409 while
    /// something that depends on it exists.
    ///
    /// Control API under /_sim: `POST /_sim/faults` with
    /// `{"error_rate": 0.1, "rate_limit_rate": 0.05, "retry_after_secs": 1,
    /// "latency_ms": 20, "hang_rate": 0, "hang_ms": 0, "fail_next": 3,
    /// "fail_status": 403, "only_method": "DELETE", "seed": 7}` injects faults
    /// (all optional; `{}` clears them; `GET` shows them); `GET /_sim/stats`,
    /// `/_sim/requests`, `/_sim/resources`; `POST /_sim/reset`. `POST
    /// /_sim/tokens` with `{"client_secret": "s", "lifetime_secs": 60,
    /// "fixed_tokens": ["t"]}` makes every request need a bearer token, which
    /// `POST /_sim/oauth/token` issues (grant_type=client_credentials and
    /// client_secret, or an IAM apikey exchange). docs/first-run.md walks
    /// through a first run against it.
    Sim {
        #[arg(long, default_value_t = 8089)]
        port: u16,
        /// Answer every request 204 (after --latency-ms): a near-zero-cost API for benchmarks.
        #[arg(long)]
        null: bool,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Counts of owners, resources and jobs by state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// One owner: its tracked resources and its jobs.
    Show {
        /// "type/id", e.g. node/node01
        owner: String,
        #[arg(long)]
        json: bool,
    },
    /// Ask each provider whether the owner's resources are really gone
    /// (PASS/FAIL): those reaper tracks and those the kinds' lookups find.
    Validate {
        #[arg(required_unless_present = "owners_from")]
        owner: Option<String>,
        /// Owners in a file, one per line (`#` comments; `-` reads stdin):
        /// a line per owner and a summary, N gone, M still there.
        #[arg(long, value_name = "FILE", conflicts_with = "owner")]
        owners_from: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// What is left of an owner, in teardown order: a table, JSON, or a shell script.
    Plan {
        owner: String,
        #[arg(long, value_enum, default_value = "table")]
        format: PlanFormat,
    },
    /// Publish a resource.tracked for one resource, as a provisioner would;
    /// prints its event_id.
    Track {
        /// The owner, "type/id" (node/n1).
        owner: String,
        /// One of the configured kinds.
        kind: String,
        /// The resource's id at its provider.
        id: String,
        /// An attribute the kind's templates use, NAME=VALUE; repeat for more.
        #[arg(long = "attr", value_parser = attribute)]
        attrs: Vec<(String, String)>,
    },
    /// Publish a provisioning.failed for an owner, as a provisioner's failure
    /// hook would; prints its event_id. What was tracked for the owner is torn
    /// down, plus the resources named here.
    ProvisioningFailed {
        /// The owner, "type/id" (node/n1).
        owner: String,
        /// What failed, in words.
        #[arg(long)]
        error: String,
        /// The step that failed (install_os).
        #[arg(long)]
        step: Option<String>,
        /// A resource it created but did not track, KIND/ID; repeat for more.
        #[arg(long = "resource", value_parser = kind_and_id)]
        resources: Vec<(String, String)>,
    },
    /// Stop every replica from starting jobs and sweeps (a flag in the ledger,
    /// seen within worker.pause_poll_ms); deliveries wait in the retry queue.
    Pause {
        #[arg(long, default_value = "paused by hand")]
        reason: String,
    },
    /// End a pause: the waiting deliveries run.
    Resume,
    /// End a job as `cancelled` (a result says so): one waiting for a retry
    /// or dead-lettered at once; one running starts no further deletes.
    Cancel {
        #[arg(required_unless_present = "owner")]
        job: Option<uuid::Uuid>,
        /// Every job of this owner that has not ended.
        #[arg(long, conflicts_with = "job")]
        owner: Option<String>,
        #[arg(long, default_value = "cancelled by hand")]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Publish a deletion.requested for an owner, as a producer would.
    RequestDeletion {
        #[arg(required_unless_present = "owners_from")]
        owner: Option<String>,
        /// Owners in a file, one per line (`#` comments; `-` reads stdin).
        /// Every line is checked before anything is sent.
        #[arg(long, value_name = "FILE", conflicts_with = "owner")]
        owners_from: Option<std::path::PathBuf>,
        /// With --owners-from: refuse a file of more owners than this.
        #[arg(long, default_value_t = 20)]
        max: usize,
        /// Plan and report only; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "requested by hand")]
        reason: String,
    },
    /// Print shell completions: reaper completions bash > /etc/bash_completion.d/reaper
    Completions { shell: clap_complete::Shell },
    /// Measure the broker's ceiling and reaper's end-to-end rate, latency, CPU and memory.
    Bench(crate::devtools::bench::BenchArgs),
    /// The whole job in one command: a simulated cloud, N sample VPC nodes, a mix
    /// of deletion and provisioning-failure events, the worker, and a summary.
    Demo(crate::devtools::demo::DemoArgs),
    /// Re-run dead-lettered jobs after fixing their cause. Steps already done
    /// stay done; each remaining resource is checked again before it is deleted.
    Replay(crate::replay::ReplayArgs),
    /// Put back the rows and documents a job deleted and archived.
    Restore(crate::restore::RestoreArgs),
    /// Sweep one reconcile rule: find orphans (only in the copy, not in the
    /// truth) and report them; with --execute, tear them down. Exit 0 when it
    /// ran, 1 when a safety rule refused, 3 when an inventory failed to load.
    Reconcile(crate::reconcile::cli::ReconcileArgs),
}

pub async fn main(cli: Cli) -> ExitCode {
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "reaper", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut log = settings.log.clone();
    if matches!(cli.command, Command::Demo(_)) {
        // The demo prints its own progress and summary; only trouble is logged.
        log.filter = "warn,lapin=off".into();
    }
    crate::telemetry::init(&log);
    match cli.command {
        Command::Run => {
            // Signals first: a SIGTERM during start-up is a clean stop too.
            let token = CancellationToken::new();
            crate::runner::cancel_on_signals(token.clone());
            let built = tokio::select! {
                built = App::build(settings) => built,
                _ = token.cancelled() => return ExitCode::SUCCESS,
            };
            let app = match built {
                Ok(a) => Arc::new(a),
                Err(e) => return report(e),
            };
            app.run(token).await;
            ExitCode::SUCCESS
        }
        Command::Migrate => match crate::ledger::Ledger::from_settings(&settings).await {
            Ok(l) => match l.migrate().await {
                Ok(()) => {
                    println!("migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => report(e.into()),
            },
            Err(e) => report(e.into()),
        },
        Command::CheckConfig { connect } => crate::ops_cli::check_config(&settings, connect).await,
        Command::Sim { port, null, latency_ms } => crate::devtools::sim::run(port, null, latency_ms).await,
        Command::Demo(args) => crate::devtools::demo::run(settings, args).await,
        Command::Replay(args) => crate::replay::run(settings, args).await,
        Command::Restore(args) => crate::restore::run(settings, args).await,
        Command::Reconcile(args) => crate::reconcile::cli::run(settings, args).await,
        Command::Bench(args) => crate::devtools::bench::run(settings, args).await,
        Command::Completions { .. } => ExitCode::SUCCESS,
        Command::Status { json } => crate::ops_cli::status(&settings, json).await,
        Command::Pause { reason } => crate::ops_cli::pause(&settings, Some(&reason)).await,
        Command::Resume => crate::ops_cli::pause(&settings, None).await,
        Command::Cancel { job, owner, reason, json } => {
            crate::ops_cli::cancel(&settings, job, owner.as_deref(), &reason, json).await
        }
        Command::Show { owner, json } => crate::ops_cli::show(&settings, &owner, json).await,
        Command::Validate { owner: Some(owner), json, .. } => crate::ops_cli::validate(settings, &owner, json).await,
        Command::Validate { owners_from: Some(file), json, .. } => {
            crate::ops_cli::validate_many(settings, &file, json).await
        }
        Command::Plan { owner, format } => crate::ops_cli::plan(settings, &owner, format).await,
        Command::Track { owner, kind, id, attrs } => {
            crate::ops_cli::track(&settings, &owner, &kind, &id, &attrs.into_iter().collect()).await
        }
        Command::ProvisioningFailed { owner, error, step, resources } => {
            crate::ops_cli::provisioning_failed(&settings, &owner, &error, step.as_deref(), &resources).await
        }
        Command::RequestDeletion { owner: Some(owner), dry_run, reason, .. } => {
            crate::ops_cli::request_deletion(&settings, &owner, dry_run, &reason).await
        }
        Command::RequestDeletion { owners_from: Some(file), dry_run, reason, max, .. } => {
            crate::ops_cli::request_deletions(&settings, &file, dry_run, &reason, max).await
        }
        // clap requires one of the two.
        Command::Validate { .. } | Command::RequestDeletion { .. } => {
            eprintln!("error: give an owner or --owners-from FILE");
            ExitCode::from(2)
        }
    }
}

fn attribute(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

fn kind_and_id(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((k, id)) if !k.is_empty() && !id.is_empty() => Ok((k.to_string(), id.to_string())),
        _ => Err(format!("{s:?} is not KIND/ID")),
    }
}

fn report(e: AppError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        AppError::Ledger(_) => ExitCode::from(3),
        _ => ExitCode::from(2),
    }
}
