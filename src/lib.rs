//! segmentd — a real-time customer segmenter.
//!
//! Kafka consumers ingest clickstream and purchase events, keep per-customer behavioural
//! state, re-evaluate segment rules on every event (and on timers, when time alone
//! changes a rule's answer), and publish segment changes to an output topic.
//!
//! # Layout
//!
//! - [`config`]: the one config tree, from TOML with environment overrides.
//! - [`event`]: input formats (native, Segment spec) → one typed event, parsed through a
//!   JSON document that borrows from the payload.
//! - [`state`]: per-customer state, sliding windows, the concurrent customer store
//!   (idle customers held encoded), the changelog's encoding.
//! - [`rules`]: the rule language: parse, type-check, compile, evaluate, and when a rule
//!   can next change with time alone.
//! - [`time`]: timestamps and durations, partition watermarks, the timer wheel, the wall
//!   clock (manual in tests); rules are evaluated at a time passed in.
//! - [`engine`]: one event in, segment changes out; pure.
//! - [`emit`]: segment-change records, the producer, dead letters.
//! - [`ingest`]: the Kafka consumer loop, offsets, changelog and restores, exactly-once
//!   transactions, re-keying, the store's sweeper, shutdown.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, customer and segment lookups.
//! - [`telemetry`]: every metric, in one place.
//! - [`generate`]: realistic synthetic shop traffic and rule sets of any size (demo,
//!   `generate`, tests, benches).
//! - [`cli`]: the `segmentd` commands: run, demo, replay, check, generate.

#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod emit;
pub mod engine;
pub mod event;
pub mod generate;
pub mod http;
pub mod ingest;
pub mod rules;
pub mod state;
pub mod telemetry;
pub mod time;
