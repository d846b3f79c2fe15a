//! lytics-relay: moves customer events into Lytics.
//!
//! # Layout
//!
//! The modules follow the pipeline, in the order an event travels:
//!
//! - [`ingress`]: the gRPC and HTTP doors senders call.
//! - [`normalize`]: validates what was posted into an event document, with every invalid field.
//! - [`rules`]: YAML rules compiled once and evaluated as pure functions into Lytics records.
//! - [`ingest`]: maps events with the rules in force and queues the records; answers OK only
//!   once they are queued.
//! - [`queue`]: the seam between ingest and delivery, and its backends.
//! - [`delivery`]: batches, posts, retries, pauses on setup errors, dead-letters.
//! - [`lytics`]: the collect API client: request building, sending, answer classification.
//! - [`emulator`]: a Lytics-compatible server for tests and the zero-setup default.
//!
//! - [`admin`]: operator APIs behind the admin token (dead letters).
//! - [`live`]: live events: every event and record at each stage, for the Live Events page and
//!   `LiveEventsService/Watch`; [`monitor`] reports them (and counts them in [`metrics`]).
//!
//! Beside the pipeline: [`app`] wires it all and shuts it down in order, [`config`] and [`cli`]
//! read and validate settings, [`telemetry`] holds span names and exporters, [`integration`] the
//! validated integration types, [`error`] the one error type of every API, [`timefmt`] time
//! parsing, [`proto`] the generated gRPC code.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod emulator;
pub mod error;
pub mod ingest;
pub mod ingress;
pub mod integration;
pub mod live;
pub mod lytics;
pub mod metrics;
pub mod monitor;
pub mod normalize;
pub mod proto;
pub mod queue;
pub mod reload;
pub mod rules;
pub mod telemetry;
pub mod timefmt;
