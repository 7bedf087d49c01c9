//! Output: segment-change records ([`change`]), and the Kafka producer paths for changes
//! and dead letters ([`producer`]).

pub mod change;
pub mod producer;
