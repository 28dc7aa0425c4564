//! What the project uses to show, measure and test reaper, never the worker:
//! `reaper demo`, `reaper bench` (and its bare broker loop, `ceiling`, and the
//! reconcile benchmark), and the simulated cloud the tests and the demo run
//! against. The worker's modules do not import anything from here.

pub mod baseline;
pub mod bench;
pub mod ceiling;
pub mod demo;
pub mod reconcile_bench;
pub mod sim;
