//! The store's sweeper: a thread that sweeps the customer store every
//! `state.idle_after`, so that customers without an event or a timer for that long are
//! held encoded, and compressed once the store has a dictionary (see
//! [`crate::state::store`]). A sweep takes the map's locks one shard
//! (to clear marks) or one customer (to copy it, or to swap its encoding in) at a time,
//! and encodes outside them, so the consume loop goes on beside it.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::state::CustomerStore;
use crate::telemetry::Metrics;

/// The running sweeper.
pub struct Sweeper {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Sweeper {
    /// Sweeps `store` every `every` (none when zero), setting `segmentd_customers_idle`.
    pub fn start(store: CustomerStore, every: Duration, metrics: Arc<Metrics>) -> Option<Self> {
        if every.is_zero() {
            return None;
        }
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-sweeper".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let started = Instant::now();
                    let sweep = store.compact_idle();
                    metrics.customers_idle.set(sweep.idle as i64);
                    tracing::debug!(
                        encoded = sweep.encoded,
                        packed = sweep.packed,
                        idle = sweep.idle,
                        customers = sweep.customers,
                        seconds = started.elapsed().as_secs_f64(),
                        "Swept the store."
                    );
                }
            })
            .expect("a thread can be spawned");
        Some(Sweeper { stop, thread })
    }

    /// Stops the thread (after the sweep in progress, if any).
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
