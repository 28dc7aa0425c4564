//! Integration tests against the real RabbitMQ and PostgreSQL, with the
//! simulated cloud over real HTTP. Each test gets its own database and its own
//! broker prefix (see `helpers::spawn_app`), so they run in parallel.

mod group_commit;
mod helpers;
mod lives_matrix;

mod admin;
mod browser;
mod bulk_tracks;
mod commands;
mod console;
mod contract_proto;
mod control;
mod credentials;
mod deploy;
mod door;
mod examples;
mod first_hour;
mod malformed;
mod owner_lives;
mod reconcile;
mod reliability;
mod secrets;
mod sql_kinds;
mod startup;
mod teardown;
mod tls;
