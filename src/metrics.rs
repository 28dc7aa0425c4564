//! Every metric reaper exports, defined in one place. Names are stable and
//! listed in docs/operations.md; each `App` has its own registry.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Deliveries handled, by routing key and what became of them.
    pub events: IntCounterVec,
    /// Jobs that ended, by outcome (completed, dead_lettered).
    pub jobs: IntCounterVec,
    /// One provider step (with its in-process retries), by kind and provider.
    pub step_seconds: HistogramVec,
    /// Attempts beyond the first within steps, by kind.
    pub step_retries: IntCounterVec,
    /// Messages parked in a retry queue, by why (unfinished, busy, infra, panic).
    pub broker_retries: IntCounterVec,
    /// Messages put on the dead queue, by class.
    pub dead_letters: IntCounterVec,
    pub outbox_backlog: IntGauge,
    pub in_flight: IntGauge,
    /// 1 while consuming and connected.
    pub ready: IntGauge,
    /// 1 while an operator has paused reaper (as this replica last read it).
    pub paused: IntGauge,
    /// Jobs dead-lettered and not replayed or cancelled since (the ledger's count).
    pub dead_jobs: IntGauge,
    /// Reconcile sweeps, by rule and outcome (acted, nothing_to_do, dry_run, refused, failed, busy).
    pub reconcile_runs: IntCounterVec,
    pub reconcile_seconds: HistogramVec,
    /// Orphans the last sweep of a rule found (before grace and quarantine).
    pub reconcile_orphans: IntGaugeVec,
    /// Teardown events reconcile published, by rule.
    pub reconcile_published: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new("reaper_events_consumed_total", "Deliveries handled, by routing key and verdict"),
            &["routing_key", "verdict"],
        )
        .expect("valid metric");
        let jobs = IntCounterVec::new(Opts::new("reaper_jobs_total", "Jobs that ended, by outcome"), &["outcome"])
            .expect("valid metric");
        let step_seconds = HistogramVec::new(
            HistogramOpts::new(
                "reaper_step_duration_seconds",
                "Time to delete (or check) one resource, retries included",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["kind", "provider"],
        )
        .expect("valid metric");
        let step_retries = IntCounterVec::new(
            Opts::new("reaper_step_retries_total", "In-process retries of resource steps"),
            &["kind"],
        )
        .expect("valid metric");
        let broker_retries =
            IntCounterVec::new(Opts::new("reaper_broker_retries_total", "Messages parked in a retry queue"), &["why"])
                .expect("valid metric");
        let dead_letters =
            IntCounterVec::new(Opts::new("reaper_dead_letters_total", "Messages put on the dead queue"), &["class"])
                .expect("valid metric");
        let outbox_backlog = IntGauge::new("reaper_outbox_backlog", "Outbox rows not yet confirmed by the broker")
            .expect("valid metric");
        let in_flight = IntGauge::new("reaper_jobs_in_flight", "Deliveries being handled now").expect("valid metric");
        let ready =
            IntGauge::new("reaper_ready", "1 while the worker is connected and consuming").expect("valid metric");
        let paused = IntGauge::new("reaper_paused", "1 while an operator has paused reaper (reaper pause)")
            .expect("valid metric");
        let dead_jobs = IntGauge::new(
            "reaper_dead_lettered_jobs",
            "Jobs dead-lettered and neither replayed nor cancelled since (the ledger's list of what is dead)",
        )
        .expect("valid metric");
        let reconcile_runs = IntCounterVec::new(
            Opts::new("reaper_reconcile_runs_total", "Reconcile sweeps, by rule and outcome"),
            &["rule", "outcome"],
        )
        .expect("valid metric");
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new("reaper_reconcile_duration_seconds", "Time of one reconcile sweep")
                .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0]),
            &["rule"],
        )
        .expect("valid metric");
        let reconcile_orphans =
            IntGaugeVec::new(Opts::new("reaper_reconcile_orphans", "Orphans found by the last sweep"), &["rule"])
                .expect("valid metric");
        let reconcile_published = IntCounterVec::new(
            Opts::new("reaper_reconcile_published_total", "Teardown events published by reconcile"),
            &["rule"],
        )
        .expect("valid metric");
        let m = Metrics {
            registry,
            events,
            jobs,
            step_seconds,
            step_retries,
            broker_retries,
            dead_letters,
            outbox_backlog,
            in_flight,
            ready,
            paused,
            dead_jobs,
            reconcile_runs,
            reconcile_seconds,
            reconcile_orphans,
            reconcile_published,
        };
        for c in m.collectors() {
            m.registry.register(c).expect("each metric registered once");
        }
        m
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.events.clone()),
            Box::new(self.jobs.clone()),
            Box::new(self.step_seconds.clone()),
            Box::new(self.step_retries.clone()),
            Box::new(self.broker_retries.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.outbox_backlog.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.paused.clone()),
            Box::new(self.dead_jobs.clone()),
            Box::new(self.reconcile_runs.clone()),
            Box::new(self.reconcile_seconds.clone()),
            Box::new(self.reconcile_orphans.clone()),
            Box::new(self.reconcile_published.clone()),
        ]
    }

    /// The name of every metric reaper registers: what dashboards and alerts
    /// may use (a labelled one appears in `/metrics` once it has a series).
    pub fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for c in self.collectors() {
            names.extend(c.desc().into_iter().map(|d| d.fq_name.clone()));
        }
        names
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
