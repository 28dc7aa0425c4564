//! Runs the worker: the consumer, the admin API, the reconcile schedules, the
//! lease heartbeat and the outbox clearer, over one `App`, until one
//! cancellation token says stop. `app.rs` holds the state; this starts and
//! stops what works on it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::redact_url;

impl App {
    /// Runs the worker until `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.running.store(true, std::sync::atomic::Ordering::SeqCst);
        let this = self.clone();
        tracing::info!(broker = %redact_url(self.settings.broker.url.expose()), prefix = %self.settings.broker.prefix, "starting the worker");
        // The heartbeat outlives `shutdown`: the jobs finishing in the grace
        // period still hold their owners, or a duplicate on another worker
        // would find a lease run out and run the same deletes beside them.
        let stop_beat = CancellationToken::new();
        let beat = tokio::spawn(heartbeat(self.clone(), stop_beat.clone()));
        let rx = self.take_confirmed();
        let stop_clearer = CancellationToken::new();
        let clearer = rx.map(|rx| tokio::spawn(crate::outbox::clear(self.ledger.clone(), rx, stop_clearer.clone())));
        let admin = self.take_admin_listener().map(|listener| {
            let (app, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(app, listener, stop).await {
                    tracing::error!(error = %e, "the admin API stopped");
                }
            })
        });
        // Read before the first delivery, then every pause_poll_ms.
        self.read_pause().await;
        let pause = tokio::spawn(watch_pause(self.clone(), shutdown.clone()));
        let sweeps = tokio::spawn(crate::reconcile::schedule::run(self.clone(), shutdown.clone()));
        crate::consumer::run(self, shutdown).await;
        stop_beat.cancel();
        let _ = beat.await;
        let _ = sweeps.await;
        let _ = pause.await;
        stop_clearer.cancel();
        if let Some(c) = clearer {
            let _ = c.await;
        }
        if let Some(a) = admin {
            let _ = a.await;
        }
        this.link.close().await;
        this.running.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Reads the pause flag, and counts the dead-lettered jobs for
/// `reaper_dead_lettered_jobs`, every `worker.pause_poll_ms` until `stop`.
async fn watch_pause(app: Arc<App>, stop: CancellationToken) {
    let every = Duration::from_millis(app.settings.worker.pause_poll_ms.max(50));
    loop {
        if let Ok(n) = app.ledger.dead_count().await {
            app.metrics.dead_jobs.set(n);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        app.read_pause().await;
    }
}

/// Renews the owner leases of every delivery in hand, a few times per lease,
/// until `stop` (after the consumer's last job has ended or been handed back).
async fn heartbeat(app: Arc<App>, stop: CancellationToken) {
    let every = app.ledger.lease_ttl() / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let holders = app.holders.snapshot();
        if let Err(e) = app.ledger.renew(&holders).await {
            tracing::warn!(error = %e, "could not renew owner leases; they may expire and the owners be taken over");
        }
        app.read_cancels().await;
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C. The handlers are installed before
/// this returns: a SIGTERM that comes while the worker is still starting
/// (connecting, migrating) stops it cleanly, instead of killing it as the
/// default action would (exit by signal, not 0; the chaos suite saw it).
pub fn cancel_on_signals(token: CancellationToken) {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).expect("installing a SIGTERM handler"),
            signal(SignalKind::interrupt()).expect("installing a SIGINT handler"),
        )
    };
    tokio::spawn(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("signal received: shutting down");
        token.cancel();
    });
}
