//! `reaper restore JOB`: puts the rows and documents a job archived back where
//! they were. What a job deleted through a cloud API cannot come back; the
//! report says so, resource by resource.

use std::process::ExitCode;

use serde::Serialize;
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::ledger::Ledger;
use crate::providers::Providers;

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The job whose archived records to put back.
    pub job_id: Uuid,
    /// Say what would be restored; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RestoreReport {
    pub job_id: String,
    pub dry_run: bool,
    pub restored: u64,
    /// A record with the same key is there again; left as it is.
    pub already_present: u64,
    /// Restored by an earlier run.
    pub restored_before: u64,
    pub failed: Vec<String>,
    /// Deleted through an API: cannot be undone.
    pub not_restorable: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no job {0}")]
    NoJob(Uuid),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    Provider(#[from] crate::providers::ProviderError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// For the CLI: builds the catalog, ledger and providers from `settings`.
pub async fn restore(settings: &Settings, job_id: Uuid, dry_run: bool) -> Result<RestoreReport, RestoreError> {
    let catalog = crate::catalog::validate(settings)?;
    let ledger = crate::ledger::Ledger::from_settings(settings).await?;
    let providers = Providers::build(&settings.providers).await?;
    restore_with(&catalog, &ledger, &providers, job_id, dry_run).await
}

/// Puts back what `job_id` archived, with the given catalog, ledger and providers.
pub async fn restore_with(
    catalog: &Catalog,
    ledger: &Ledger,
    providers: &Providers,
    job_id: Uuid,
    dry_run: bool,
) -> Result<RestoreReport, RestoreError> {
    let view = ledger.job_view(job_id).await?.ok_or(RestoreError::NoJob(job_id))?;
    let mut report = RestoreReport { job_id: job_id.to_string(), dry_run, ..Default::default() };
    for step in &view.steps {
        let text = |f: &str| step.get(f).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let (kind, id) = (text("kind"), text("id"));
        let archived = catalog.kind(&kind).and_then(|k| k.archive.as_ref()).is_some();
        if text("outcome") == "deleted" && !archived {
            let why = match catalog.kind(&kind).is_some_and(|k| k.delete.cannot_be_undone()) {
                true => "deleted through an API, which cannot be undone",
                false => "deleted by a kind without `archive = true`",
            };
            report.not_restorable.push(format!("{kind}/{id}: {why}"));
        }
    }
    let mut done = Vec::new();
    for a in ledger.archived(job_id).await? {
        if a.restored {
            report.restored_before += 1;
            continue;
        }
        let spec = catalog.kind(&a.kind);
        let target = spec.and_then(|k| k.archive.clone().map(|t| (k.provider.clone(), t)));
        let Some((provider, target)) = target else {
            report
                .failed
                .push(format!("{}/{}: kind {} has no archive configured any more", a.kind, a.resource_id, a.kind));
            continue;
        };
        if dry_run {
            report.restored += 1;
            continue;
        }
        let put = match providers.get(&provider) {
            Some(p) => p.restore(&target, &a.record).await,
            None => Err(crate::providers::StepError::Permanent(format!("provider {provider} is not configured"))),
        };
        match put {
            Ok(true) => {
                report.restored += 1;
                done.push(a.id);
            }
            Ok(false) => {
                report.already_present += 1;
                done.push(a.id);
            }
            Err(e) => report.failed.push(format!("{}/{}: {e}", a.kind, a.resource_id)),
        }
    }
    if !done.is_empty() {
        ledger.mark_restored(&done).await?;
    }
    Ok(report)
}

pub async fn run(settings: Settings, args: RestoreArgs) -> ExitCode {
    match restore(&settings, args.job_id, args.dry_run).await {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r).expect("serializable"));
            } else {
                let verb = if r.dry_run { "would restore" } else { "restored" };
                println!("job {}: {verb} {} record(s)", r.job_id, r.restored);
                if r.already_present > 0 {
                    println!("  {} already present again (left as they are)", r.already_present);
                }
                if r.restored_before > 0 {
                    println!("  {} restored by an earlier run", r.restored_before);
                }
                for f in &r.failed {
                    println!("  FAILED {f}");
                }
                for n in &r.not_restorable {
                    println!("  cannot be undone: {n}");
                }
            }
            if r.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e @ RestoreError::NoJob(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e @ RestoreError::Config(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}
