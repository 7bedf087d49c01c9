//! Memory per customer: the heap the engine's state (customer store and timer wheel)
//! holds for N customers of generated traffic with the reference rules.
//!
//! Run: `cargo bench --bench memory` (`-- --customers 10000,100000,1000000,10000000` for
//! other sizes). For each size, events of `segmentd::generate` (heavy-tailed activity
//! over N ids, one event per millisecond of event time) are applied until N distinct
//! customers have state; the bytes the allocator gets back when the store and the timer
//! wheel are then dropped, divided by N, is the figure SPEC §6 bounds (512 bytes at
//! 1,000,000). The store keeps customers unused between two sweeps encoded (idle); the
//! service sweeps every `state.idle_after`, here every `--sweep-every` events (0: never,
//! every customer active: the worst case; by default 30,000, or 3 % of N when that is
//! more: see [`Args::sweep_every`]). Progress goes to stderr every 10 million events.
//! Counted by a wrapper around
//! the binary's allocator, so it is what was asked for, not what the OS was given
//! (resident memory is printed too, for comparison).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use clap::Parser;
use segmentd::config::Config;
use segmentd::engine::{Engine, Outcome, TimerUpdate};
use segmentd::event::parse_event;
use segmentd::generate::{Format, Generator, GeneratorConfig};
use segmentd::state::{CustomerState, new_store};
use segmentd::time::wheel::TimerWheel;

/// The binary's allocator, counting the bytes it holds.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed unchanged to mimalloc, which upholds `GlobalAlloc`'s
// contract; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as is.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Options of the memory benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Numbers of customers to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u32, 100_000, 1_000_000])]
    customers: Vec<u32>,
    /// Events between two sweeps of the store (idle customers encoded); 0: none. The
    /// default is 30,000 — 30 s of the traffic's event time (one event per millisecond),
    /// the service's default `state.idle_after` — or 3 % of the customers, when that is
    /// more. The service sweeps by wall time, and one holding ten times the customers
    /// sees about ten times the events in those 30 s; a fixed interval would also make
    /// each event pay for a sweep's visit of N / 30,000 customers, 330 at 10 million,
    /// and the run take hours. Up to 1,000,000 customers the two agree.
    #[arg(long)]
    sweep_every: Option<u64>,
    /// The rules' config.
    #[arg(long, default_value = "config/segmentd.toml")]
    config: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config).expect("the config is readable");
    let config = Config::from_toml_only(&text, &args.config).expect("the config parses");
    let rules = Arc::new(config.rule_set().expect("the rules compile"));
    println!(
        "| customers | events applied | sweep every (events) | events per customer | idle customers | bytes per customer | of which timers | RSS after (MiB) | seconds |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &customers in &args.customers {
        let started = Instant::now();
        let engine = Engine::new(rules.clone(), new_store(), config.time.session_gap.millis());
        let mut wheel = TimerWheel::new();
        let mut generator = Generator::new(GeneratorConfig {
            seed: 5,
            customers,
            format: Format::Native,
            invalid_share: 0.0,
        });
        let sweep_every = args
            .sweep_every
            .unwrap_or_else(|| (u64::from(customers) * 3 / 100).max(30_000));
        let mut changes = Vec::new();
        let mut events = 0u64;
        let start = 1_767_225_600_000;
        while engine.store().len() < customers as usize {
            let message = generator.next_at(start + events as i64);
            let event = parse_event(&message.payload, 1 << 16).expect("generated events parse");
            changes.clear();
            if let Outcome::Applied {
                timer: TimerUpdate::Set(at),
                ..
            } = engine.apply(&event, &mut changes)
            {
                wheel.schedule(&event.customer_id, at);
            }
            events += 1;
            if sweep_every > 0 && events.is_multiple_of(sweep_every) {
                engine.store().compact_idle();
            }
            if events.is_multiple_of(10_000_000) {
                eprintln!(
                    "{customers}: {events} events, {} customers, RSS {} MiB, {:.0} s",
                    engine.store().len(),
                    resident_mib(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let (parts, active, idle_bytes) = breakdown(&engine);
        let idle_share = 1.0 - active as f64 / engine.store().len() as f64;
        // What dropping them frees is exactly what the store and the wheel held.
        let resident = resident_mib();
        let before_drop = HELD.load(Ordering::Relaxed);
        drop(wheel);
        let timers = before_drop - HELD.load(Ordering::Relaxed);
        drop(engine);
        let held = before_drop - HELD.load(Ordering::Relaxed);
        println!(
            "| {customers} | {events} | {sweep_every} | {:.1} | {:.0} % | {} | {} | {} | {:.0} |",
            events as f64 / f64::from(customers),
            idle_share * 100.0,
            held / customers as isize,
            timers / customers as isize,
            resident,
            started.elapsed().as_secs_f64(),
        );
        let per_customer = |bytes: usize| bytes / customers as usize;
        let listed: usize = parts.iter().map(|(_, bytes)| bytes).sum::<usize>() + idle_bytes;
        let described: Vec<String> = parts
            .iter()
            .map(|(part, bytes)| format!("{part} {}", per_customer(*bytes)))
            .collect();
        println!(
            "|  | bytes per customer by part (active customers): {}; idle encodings {}; map and allocation slack {} |",
            described.join(", "),
            per_customer(idle_bytes),
            (held as usize).saturating_sub(timers as usize + listed) / customers as usize,
        );
    }
}

/// Heap bytes the allocator hands out to build `make`'s value (a clone: exact
/// capacities, so slack in the originals is not included).
fn heap_of<T>(make: impl FnOnce() -> T) -> usize {
    let before = HELD.load(Ordering::Relaxed);
    let value = make();
    let bytes = HELD.load(Ordering::Relaxed) - before;
    drop(value);
    bytes.max(0) as usize
}

/// Where the store's bytes go, summed over its active customers: the inline struct (with
/// the recent events' keys), the id, and each part's heap; with the number of active
/// customers and the bytes of the idle ones' encodings.
fn breakdown(engine: &Engine) -> (Vec<(&'static str, usize)>, usize, usize) {
    let mut parts = [
        ("inline state", 0),
        ("id", 0),
        ("slots", 0),
        ("context+traits", 0),
        ("categories", 0),
        ("cart", 0),
        ("session+segments", 0),
    ];
    let mut active = 0;
    let idle_bytes = engine.store().for_each_active(|id, state| {
        active += 1;
        parts[0].1 += std::mem::size_of::<CustomerState>();
        parts[1].1 += heap_of(|| Box::<str>::from(id));
        parts[2].1 += heap_of(|| state.slots.clone());
        parts[3].1 += heap_of(|| (state.context.clone(), state.traits.clone()));
        parts[4].1 += heap_of(|| state.categories.clone());
        parts[5].1 += heap_of(|| state.cart.lines.clone());
        parts[6].1 += heap_of(|| (state.session.id.clone(), state.segments.clone()));
    });
    (parts.to_vec(), active, idle_bytes)
}

/// This process's resident memory, MiB.
fn resident_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}
