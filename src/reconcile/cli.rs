//! `reaper reconcile RULE [--execute] [--force]`: dry run unless told.

use std::process::ExitCode;

use super::{Mode, Outcome, ReconcileError, Report, Sweeper};
use crate::config::Settings;

#[derive(clap::Args, Debug)]
pub struct ReconcileArgs {
    /// The rule (a [reconcile.rules.NAME] section); omit to list the rules.
    pub rule: Option<String>,
    /// Tear the orphans down. Without it the sweep only reports and changes nothing.
    #[arg(long)]
    pub execute: bool,
    /// Go past the max_count / max_fraction brakes (never past a failed or empty inventory).
    #[arg(long)]
    pub force: bool,
    /// This run's age for "old enough" (48h, 90m, 7d) instead of the rule's
    /// grace_secs. Executing with a shorter one needs --force.
    #[arg(long, value_name = "AGE", value_parser = crate::domain::parse_age)]
    pub older_than: Option<f64>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(settings: Settings, args: ReconcileArgs) -> ExitCode {
    let Some(rule) = args.rule else {
        if settings.reconcile.rules.is_empty() {
            println!("no reconcile rules are configured");
        }
        for (name, r) in &settings.reconcile.rules {
            let every = r.when();
            println!("{name:<28} {every}");
        }
        return ExitCode::SUCCESS;
    };
    // Validated first, so a bad rule is a configuration error, not a failed sweep.
    if let Err(e) = crate::catalog::validate(&settings) {
        return fail(2, e);
    }
    let ledger = match crate::ledger::Ledger::from_settings(&settings).await {
        Ok(l) => l,
        Err(e) => return fail(3, e),
    };
    if let Err(e) = ledger.migrate().await {
        return fail(3, e);
    }
    let providers = match crate::providers::Providers::build(&settings.providers).await {
        Ok(p) => p,
        Err(e) => return fail(2, e),
    };
    let sweeper = Sweeper { settings: &settings, ledger: &ledger, providers: &providers, metrics: None };
    match sweeper.sweep(&rule, Mode { execute: args.execute, force: args.force, older_than: args.older_than }).await {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r).expect("serializable"));
            } else {
                print_report(&r);
            }
            if r.outcome == Outcome::Refused {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e @ (ReconcileError::UnknownRule(_) | ReconcileError::Refused { .. })) => fail(2, e),
        Err(e) => fail(3, e),
    }
}

fn fail(code: u8, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}

pub fn print_report(r: &Report) {
    let mode = if r.dry_run { "dry run (nothing changed; --execute to act)" } else { "executed" };
    println!("reconcile {} — sweep {}, {mode}", r.rule, r.sweep);
    match r.truth {
        Some(t) => println!("  truth items:     {t}"),
        None => println!("  truth items:     (no truth inventory: every copy item is a candidate)"),
    }
    println!("  copy items:      {} (+{} excluded by filters)", r.copy, r.excluded);
    println!("  orphans:         {}", r.orphans);
    println!(
        "    too young:     {} (younger than {})",
        r.too_young,
        crate::domain::human(std::time::Duration::from_secs_f64(r.grace_secs))
    );
    println!("    in quarantine: {}", r.in_quarantine);
    println!("    actionable:    {}", r.actionable);
    if r.already_requested > 0 {
        println!(
            "    already requested by an earlier sweep: {} (see reaper replay for dead-lettered ones)",
            r.already_requested
        );
    }
    if r.unusable_values > 0 {
        println!(
            "    not requested: {} whose id or attributes would change a request path (empty, \".\", \"..\")",
            r.unusable_values
        );
    }
    if !r.sample_actionable.is_empty() {
        println!("  e.g. {}", r.sample_actionable.join(", "));
    }
    if !r.sample_waiting.is_empty() {
        println!("  waiting, e.g. {}", r.sample_waiting.join(", "));
    }
    match r.outcome {
        Outcome::Refused => println!("REFUSED: {}", r.refused.as_deref().unwrap_or("")),
        Outcome::Acted => println!("published {} teardown(s); results arrive on the results exchange", r.published),
        _ if r.orphans == 0 => println!("no cleanup needed"),
        _ => {}
    }
}
