//! The application state, built once from settings and shared by every task.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::{self, Names};
use crate::config::{redact_url, Catalog, ConfigError, Settings};
use crate::ledger::{Ledger, LedgerError};
use crate::providers::{ProviderError, Providers};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

pub struct App {
    pub settings: Settings,
    pub catalog: Catalog,
    pub ledger: Ledger,
    pub providers: Providers,
    pub names: Names,
    /// Consuming and connected; what readiness reports.
    pub ready: AtomicBool,
}

impl App {
    /// Validates the settings, connects to PostgreSQL and applies migrations.
    /// Fails before touching the broker if anything is wrong.
    pub async fn build(settings: Settings) -> Result<App, AppError> {
        let catalog = settings.validate()?;
        if catalog.is_empty() {
            return Err(ConfigError::Invalid(
                "no kinds are configured: add [kinds.NAME] sections (see config/vpc-node.toml)"
                    .into(),
            )
            .into());
        }
        let providers = Providers::build(&settings.providers)?;
        let window = Duration::from_secs(settings.worker.late_track_window_secs);
        tracing::info!(database = %redact_url(settings.database.url.expose()), "connecting to the ledger");
        let ledger = Ledger::connect(&settings.database, window).await?;
        ledger.migrate().await?;
        let names = Names::new(&settings.broker.prefix);
        Ok(App {
            settings,
            catalog,
            ledger,
            providers,
            names,
            ready: AtomicBool::new(false),
        })
    }

    /// Runs the worker until `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(broker = %redact_url(self.settings.broker.url.expose()), prefix = %self.settings.broker.prefix, "starting the worker");
        broker::consumer::run(self, shutdown).await;
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("signal received: shutting down");
        token.cancel();
    });
}
