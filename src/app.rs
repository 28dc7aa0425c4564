//! The application state, built once from settings and shared by every task.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use uuid::Uuid;

use crate::broker::{self, Names};
use crate::catalog::Catalog;
use crate::config::{redact_url, ConfigError, Settings};
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
    /// Between the start and the end of `run`, reconnects included.
    pub running: AtomicBool,
    /// Deliveries being handled, whose owner leases the heartbeat renews.
    pub holders: Holders,
    pub metrics: crate::metrics::Metrics,
    /// The admin API's bearer token, if configured.
    pub admin_token: Option<crate::config::Secret>,
    /// Where the admin API listens once it does (`admin.listen` may say port 0).
    pub admin_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// The broker connection the admin API publishes through (teardown and
    /// replay requests), opened on first use.
    pub link: broker::link::SharedLink,
    /// Jobs whose outbox rows are confirmed, cleared in batches by one task.
    confirmed: tokio::sync::mpsc::UnboundedSender<Uuid>,
    confirmed_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Uuid>>>,
    /// The jobs this replica is running, and the cancel asked of each (read
    /// by the lease heartbeat).
    in_hand: Mutex<std::collections::HashMap<Uuid, Option<String>>>,
    /// The pause flag as this replica last read it from the ledger.
    pause: Mutex<Option<crate::ledger::control::Pause>>,
    /// The admin API's socket, bound by `build` so that a port that cannot be
    /// had stops start-up; `run` serves on it.
    admin_listener: Mutex<Option<std::net::TcpListener>>,
}

/// The lease holders of this process. Each delivery registers one for as long
/// as it is being handled.
#[derive(Default)]
pub struct Holders(Mutex<HashSet<Uuid>>);

pub struct HolderGuard<'a> {
    holders: &'a Holders,
    pub id: Uuid,
}

impl Holders {
    pub fn register(&self) -> HolderGuard<'_> {
        let id = Uuid::new_v4();
        self.0.lock().expect("not poisoned").insert(id);
        HolderGuard { holders: self, id }
    }

    pub fn snapshot(&self) -> Vec<Uuid> {
        self.0.lock().expect("not poisoned").iter().copied().collect()
    }
}

impl Drop for HolderGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.holders.0.lock() {
            set.remove(&self.id);
        }
    }
}

/// A job running on this replica (see [`App::hold_job`]).
pub(crate) struct InHand<'a> {
    app: &'a App,
    job_id: Uuid,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if let Ok(mut in_hand) = self.app.in_hand.lock() {
            in_hand.remove(&self.job_id);
        }
    }
}

/// What start-up checks produce before anything connects.
pub struct Checked {
    pub catalog: Catalog,
    pub providers: Providers,
    pub admin_token: Option<crate::config::Secret>,
}

impl App {
    /// Every check `reaper run` makes before it connects to anything: the
    /// configuration, at least one kind, every provider's client (its token
    /// variable or file read), the admin listener and its token.
    /// `reaper check-config` runs exactly this, so "valid" means `run` starts
    /// as far as the configuration goes.
    pub async fn check(settings: &Settings) -> Result<Checked, AppError> {
        let catalog = crate::catalog::validate(settings)?;
        if catalog.is_empty() {
            return Err(ConfigError::Invalid(
                "no kinds are configured: give a config file with [kinds.NAME] sections with --config FILE \
                 (or REAPER_CONFIG); config/vpc-node.toml is an example"
                    .into(),
            )
            .into());
        }
        let providers = Providers::build(&settings.providers).await?;
        let admin_token = settings.admin.token()?;
        if !settings.admin.listen.is_empty() {
            let addr: std::net::SocketAddr = settings.admin.listen.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "admin.listen {:?} is not an address like 127.0.0.1:9090",
                    settings.admin.listen
                ))
            })?;
            if !addr.ip().is_loopback() && admin_token.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "admin.listen {addr} is not a loopback address and no admin token is set ({} or admin.token_file); refusing to start",
                    settings.admin.token_env
                ))
                .into());
            }
            // The token is all that stands between the listener and every
            // admin action (the API's and the console's login alike).
            if let Some(t) = admin_token.as_ref().filter(|t| t.expose().chars().count() < 24) {
                tracing::warn!(
                    length = t.expose().chars().count(),
                    "the admin token is short; use at least 32 random characters (openssl rand -hex 32)"
                );
            }
        }
        Ok(Checked { catalog, providers, admin_token })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, std::sync::atomic::Ordering::Relaxed);
        self.metrics.ready.set(i64::from(ready));
    }

    /// The receiving end of `outbox_confirmed`, for the one clearer task.
    pub(crate) fn take_confirmed(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Uuid>> {
        self.confirmed_rx.lock().expect("not poisoned").take()
    }

    /// The job's result is confirmed by the broker: its outbox rows can go.
    /// Batched, so a busy worker spends one statement on many jobs.
    pub fn outbox_confirmed(&self, job_id: Uuid) {
        let _ = self.confirmed.send(job_id);
    }

    /// Marks a job as running here until the guard drops.
    pub(crate) fn hold_job(&self, job_id: Uuid) -> InHand<'_> {
        self.in_hand.lock().expect("not poisoned").insert(job_id, None);
        InHand { app: self, job_id }
    }

    /// Why an operator cancelled this running job, once the heartbeat has read it.
    pub fn cancel_reason(&self, job_id: Uuid) -> Option<String> {
        self.in_hand.lock().expect("not poisoned").get(&job_id).cloned().flatten()
    }

    /// Reads the cancels asked of the jobs in hand (with the lease heartbeat).
    pub(crate) async fn read_cancels(&self) {
        let jobs: Vec<Uuid> = self.in_hand.lock().expect("not poisoned").keys().copied().collect();
        if jobs.is_empty() {
            return;
        }
        match self.ledger.cancels_requested(&jobs).await {
            Ok(asked) => {
                let mut in_hand = self.in_hand.lock().expect("not poisoned");
                for (job, why) in asked {
                    if let Some(slot) = in_hand.get_mut(&job) {
                        *slot = Some(why);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read cancel requests; trying again"),
        }
    }

    /// Whether an operator has paused reaper, as last read (see [`App::read_pause`]).
    pub fn paused(&self) -> Option<crate::ledger::control::Pause> {
        self.pause.lock().expect("not poisoned").clone()
    }

    /// Reads the pause flag from the ledger and says so when it changed. A
    /// failed read keeps what was known: the ledger being down stops jobs anyway.
    pub async fn read_pause(&self) {
        let now = match self.ledger.paused().await {
            Ok(p) => p,
            Err(e) => return tracing::debug!(error = %e, "could not read the pause flag; keeping the last one"),
        };
        let before = std::mem::replace(&mut *self.pause.lock().expect("not poisoned"), now.clone());
        match (&before, &now) {
            (None, Some(p)) => tracing::warn!(reason = %p.reason, by = %p.by, "paused: no job starts, no sweep runs"),
            (Some(_), None) => tracing::info!("resumed"),
            _ => {}
        }
        self.metrics.paused.set(i64::from(now.is_some()));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Validates the settings, connects to PostgreSQL and applies migrations.
    /// Fails before touching the broker if anything is wrong.
    pub async fn build(settings: Settings) -> Result<App, AppError> {
        let Checked { catalog, providers, admin_token } = App::check(&settings).await?;
        let (confirmed, confirmed_rx) = tokio::sync::mpsc::unbounded_channel();
        tracing::info!(database = %redact_url(settings.database.url.expose()), "connecting to the ledger");
        let ledger = crate::ledger::Ledger::from_settings(&settings).await?;
        ledger.migrate().await?;
        let names = Names::new(&settings.broker.prefix);
        let admin_listener = bind_admin(&settings)?;
        let admin_addr = std::sync::OnceLock::new();
        if let Some(l) = &admin_listener {
            let _ = admin_addr.set(l.local_addr().map_err(|e| admin_error(&settings, e))?);
        }
        Ok(App {
            settings,
            catalog,
            ledger,
            providers,
            names,
            ready: AtomicBool::new(false),
            running: AtomicBool::new(false),
            holders: Holders::default(),
            metrics: metrics(),
            admin_token,
            admin_addr,
            link: broker::link::SharedLink::default(),
            confirmed,
            confirmed_rx: Mutex::new(Some(confirmed_rx)),
            pause: Mutex::new(None),
            in_hand: Mutex::default(),
            admin_listener: Mutex::new(admin_listener),
        })
    }

    /// The admin API's socket, once: `run` takes it.
    pub(crate) fn take_admin_listener(&self) -> Option<std::net::TcpListener> {
        self.admin_listener.lock().expect("not poisoned").take()
    }
}

/// Binds `admin.listen` (none when it is empty).
fn bind_admin(settings: &Settings) -> Result<Option<std::net::TcpListener>, ConfigError> {
    if settings.admin.listen.is_empty() {
        return Ok(None);
    }
    let listener = std::net::TcpListener::bind(&settings.admin.listen).map_err(|e| admin_error(settings, e))?;
    listener.set_nonblocking(true).map_err(|e| admin_error(settings, e))?;
    Ok(Some(listener))
}

fn admin_error(settings: &Settings, e: std::io::Error) -> ConfigError {
    ConfigError::Invalid(format!(
        "admin.listen {}: cannot listen there ({e}); choose a free port, or set admin.listen = \"\" for no admin API",
        settings.admin.listen
    ))
}

/// The metrics, with the series alerts ask for from the start: a job outcome,
/// dead-letter class or retry reason that has not happened yet reads 0, not
/// "no data" (a `rate()` over a series that appears only with its first
/// event misses that event).
fn metrics() -> crate::metrics::Metrics {
    use crate::disposition::{ErrorClass, RetryReason};
    let m = crate::metrics::Metrics::new();
    for outcome in ["completed", "dead_lettered", "cancelled"] {
        m.jobs.with_label_values(&[outcome]);
    }
    for class in ErrorClass::ALL {
        m.dead_letters.with_label_values(&[class.as_str()]);
    }
    for why in RetryReason::ALL {
        m.broker_retries.with_label_values(&[why.as_str()]);
    }
    m
}
