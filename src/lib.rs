//! reaper tears down what deleted or half-provisioned things left behind, in
//! dependency order, as a durable worker on RabbitMQ with a PostgreSQL ledger.
//!
//! # Layout
//! - [`contract`]: the wire format; the only module that knows the JSON shapes.
//! - [`domain`]: plain types (resources, outcomes, triggers).
//! - [`config`]: settings and the validated catalog of resource kinds.
//! - [`plan`]: pure ordering of resources into levels.
//! - [`ledger`]: tracked resources, jobs and steps in PostgreSQL.
//! - [`providers`]: how one resource is deleted and checked: HTTP APIs, PostgreSQL rows, MongoDB documents.
//! - [`execute`]: runs a plan with bounded concurrency and in-process retries.
//! - [`handler`]: one event end to end, ending in a [`retry::Disposition`].
//! - [`retry`]: the one classification into ack / retry later / dead-letter.
//! - [`broker`]: the only code that knows lapin.
//! - [`app`]: the state built from settings, and the run loop.
//! - [`admin`]: the admin HTTP API; [`metrics`]: every metric; [`ops`]: what operators ask, for the API and the CLI.
//! - [`sim`]: the simulated cloud used by the demo and the tests.
//! - [`demo`]: `reaper demo`.
//! - [`bench`]: `reaper bench`, the benchmark the performance figures come from.
//! - [`replay`]: `reaper replay`, for dead-lettered jobs; [`restore`]: `reaper restore`, for archived rows and documents.
//! - [`reconcile`]: orphan sweeps (inventories, set difference, safety brakes, schedule).

pub mod admin;
pub mod app;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub mod contract;
pub mod demo;
pub mod domain;
pub mod execute;
pub mod handler;
pub mod ledger;
pub mod metrics;
pub mod ops;
pub mod ops_cli;
pub mod outbox;
pub mod plan;
pub mod providers;
pub mod reconcile;
pub mod replay;
pub mod restore;
pub mod retry;
pub mod sim;
pub mod telemetry;
