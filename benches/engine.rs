//! Criterion benchmarks of the pure engine on generated traffic with the reference rules:
//! parsing each input format, the whole per-event path (parse, state, rules, deadlines)
//! with the reference rules and with 1 to 1,000 generated ones, its state update and its
//! rule evaluation alone,
//! the timer wheel's cost against the number of timers pending, and restoring state.
//! Run: `cargo bench --bench engine`. Results and machine in BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use segmentd::config::Config;
use segmentd::engine::Engine;
use segmentd::event::{Event, parse_event};
use segmentd::generate::{Format, Generator, GeneratorConfig, rules_toml};
use segmentd::ingest::restore::Loader;
use segmentd::rules::eval::{Scope, eval};
use segmentd::state::codec::{Snapshot, encode};
use segmentd::state::{CustomerState, new_store};
use segmentd::time::wheel::TimerWheel;

/// The binary's allocator, so the benches measure what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 20_000;

/// How many events precede the timed ones in the warm per-event bench: 16 per customer.
const HISTORY: usize = 80_000;

/// `EVENTS` generated events for 5,000 customers, 20 ms apart.
fn traffic(format: Format) -> Vec<Vec<u8>> {
    generated(format, EVENTS)
}

/// `count` generated events for 5,000 customers, 20 ms apart.
fn generated(format: Format, count: usize) -> Vec<Vec<u8>> {
    let mut generator = Generator::new(GeneratorConfig {
        seed: 11,
        customers: 5_000,
        format,
        invalid_share: 0.0,
    });
    (0..count)
        .map(|i| generator.next_at(1_767_225_600_000 + i as i64 * 20).payload)
        .collect()
}

fn reference_engine() -> Engine {
    engine_for(&reference_text())
}

fn reference_text() -> String {
    std::fs::read_to_string("config/segmentd.toml").expect("run from the crate root")
}

fn config_of(text: &str) -> Config {
    Config::from_toml_only(text, "bench").expect("the config parses")
}

/// An empty engine with the rules of a config text.
fn engine_for(text: &str) -> Engine {
    let config = config_of(text);
    Engine::new(
        Arc::new(config.rule_set().expect("the rules compile")),
        new_store(),
        config.time.session_gap.millis(),
    )
}

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (name, format) in [
        ("native", Format::Native),
        ("segment_spec", Format::Segment),
    ] {
        let messages = traffic(format);
        group.throughput(Throughput::Elements(messages.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                for message in &messages {
                    black_box(parse_event(black_box(message), 1 << 16).ok());
                }
            })
        });
    }
    // The floor under any serde_json-based parser: tokenizing the native events while
    // keeping nothing.
    let messages = traffic(Format::Native);
    group.bench_function("native_tokenize_only", |b| {
        b.iter(|| {
            for message in &messages {
                black_box(serde_json::from_slice::<serde::de::IgnoredAny>(black_box(message)).ok());
            }
        })
    });
    group.finish();
}

/// The whole per-event path over `messages`: parse, state, rules, deadlines. Returns the
/// engine, so that dropping it is not timed.
fn parse_and_apply(engine: Engine, messages: &[Vec<u8>]) -> Engine {
    let mut changes = Vec::new();
    for message in messages {
        let event = parse_event(message, 1 << 16).expect("generated events parse");
        changes.clear();
        black_box(engine.apply(&event, &mut changes));
    }
    engine
}

/// The per-event path twice: from an empty engine (every customer's first event is one in
/// four: its state is created, every rule evaluated), and warm — after 16 events per
/// customer, as a long-running engine finds its customers.
fn per_event_path(c: &mut Criterion) {
    let messages = traffic(Format::Native);
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("parse_apply_reference_rules", |b| {
        // Each iteration replays the traffic into a fresh engine (built outside the timing),
        // so every event is new: replays of the same ids would be cheap duplicates.
        b.iter_batched(
            reference_engine,
            |engine| parse_and_apply(engine, &messages),
            criterion::BatchSize::LargeInput,
        )
    });
    let all = generated(Format::Native, HISTORY + EVENTS);
    let (history, timed) = all.split_at(HISTORY);
    group.throughput(Throughput::Elements(timed.len() as u64));
    // Each iteration's engine is built and given the history outside the timing.
    group.sample_size(20);
    group.bench_function("parse_apply_reference_rules_warm", |b| {
        b.iter_batched(
            || parse_and_apply(reference_engine(), history),
            |engine| parse_and_apply(engine, timed),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// The two halves of the per-event path alone, on the warm per-event bench's customers:
/// updating state (no rule evaluated), and evaluating rules (no state changed).
fn state_and_rules(c: &mut Criterion) {
    let all = generated(Format::Native, HISTORY + EVENTS);
    let (history, timed) = all.split_at(HISTORY);
    let events: Vec<Event> = timed
        .iter()
        .map(|message| parse_event(message, 1 << 16).expect("generated events parse"))
        .collect();
    let mut group = c.benchmark_group("state");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.sample_size(20);
    // Each event's customer found in the store, its id remembered (deduplication), its
    // built-in state and the rules' aggregate slots updated.
    group.bench_function("update_reference_rules_warm", |b| {
        b.iter_batched(
            || parse_and_apply(reference_engine(), history),
            |engine| {
                for event in &events {
                    let type_id = engine.rules().types.id_of(&event.event_type);
                    let mut state = engine.store().get_or_default(&event.customer_id);
                    if !state.check_and_remember(event.dedup_key) {
                        let now = event.ts.max(state.clock);
                        engine.update_state(&mut state, event, type_id, now);
                    }
                }
                engine
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();

    // Every reference segment's current rule (the exit rule for a member, if it has one,
    // else the entry rule) against the customers' states after all the events, at each
    // state's own clock. Throughput counts rule evaluations.
    let engine = parse_and_apply(reference_engine(), &all);
    let mut ids: Vec<&str> = events.iter().map(|e| &*e.customer_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let states: Vec<CustomerState> = ids
        .iter()
        .filter_map(|id| Some(engine.store().get_mut(id)?.clone()))
        .collect();
    let rules = engine.rules().clone();
    let session_gap = config_of(&reference_text()).time.session_gap.millis();
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(
        (states.len() * rules.segments.len()) as u64,
    ));
    group.bench_function("evaluate_reference_rules", |b| {
        b.iter(|| {
            let mut holding = 0;
            for state in &states {
                let scope = Scope::Customer {
                    state,
                    now: state.clock,
                    session_gap,
                };
                for (index, segment) in rules.segments.iter().enumerate() {
                    let member = state
                        .segments
                        .iter()
                        .any(|m| usize::from(m.segment) == index);
                    let rule = &segment.rule_for(member).node;
                    holding += usize::from(eval(rule, scope, &rules.slots).is_true());
                }
            }
            black_box(holding)
        })
    });
    group.finish();
}

/// The per-event path against the number of rules: 1, 20, 100 and 1,000 generated rules
/// (`segmentd::generate::rules_toml`) on the same traffic.
fn rule_count(c: &mut Criterion) {
    let messages = traffic(Format::Native);
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.sample_size(10);
    for count in [1, 20, 100, 1_000] {
        let text = rules_toml(count);
        group.bench_function(format!("parse_apply_{count}_rules"), |b| {
            b.iter_batched(
                || engine_for(&text),
                |engine| parse_and_apply(engine, &messages),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// Timer cost against the number pending: with 10 thousand and with 1 million timers in
/// the wheel, moving 10,000 customers' timers and firing 10,000 due ones.
fn timers(c: &mut Criterion) {
    const OPS: u64 = 10_000;
    let mut group = c.benchmark_group("timers");
    group.throughput(Throughput::Elements(OPS));
    group.sample_size(10);
    for pending in [10_000u64, 1_000_000] {
        let start: i64 = 1_767_225_600_000;
        // Deadlines spread over 60 days, pseudo-random.
        let deadline =
            |i: u64| start + ((i.wrapping_mul(2_654_435_761) % 5_184_000) as i64) * 1_000;
        let ids: Vec<String> = (0..pending).map(|i| format!("c-{i}")).collect();
        let mut wheel = TimerWheel::new();
        // A running service's wheel stands at the partition's watermark.
        wheel.pop_due(start - 1);
        for (i, id) in ids.iter().enumerate() {
            wheel.schedule(id, Some(deadline(i as u64)));
        }
        group.bench_function(format!("move_{pending}_pending"), |b| {
            let mut round = 0u64;
            b.iter(|| {
                round += 1;
                for i in 0..OPS {
                    let id = &ids[((i * 7919 + round) % pending) as usize];
                    wheel.schedule(id, Some(deadline(i + round * OPS)));
                }
            })
        });
        group.bench_function(format!("fire_{pending}_pending"), |b| {
            b.iter_batched(
                || {
                    // Keep `pending` timers, OPS of them due at the watermark.
                    let mut wheel = TimerWheel::new();
                    wheel.pop_due(start - 1);
                    for (i, id) in ids.iter().enumerate() {
                        let at = if (i as u64) < OPS {
                            start + i as i64
                        } else {
                            deadline(i as u64) + 86_400_000
                        };
                        wheel.schedule(id, Some(at));
                    }
                    wheel
                },
                |mut wheel| {
                    let mut fired = 0;
                    while wheel.pop_due(start + OPS as i64).is_some() {
                        fired += 1;
                    }
                    assert_eq!(fired, OPS);
                    wheel
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// Restoring from the changelog without the broker: decoding 100,000 customers' state
/// records (generated traffic's states under distinct ids) into a fresh store, with their
/// timers. SPEC §6 asks for 500,000 customers a second.
fn restore(c: &mut Criterion) {
    const CUSTOMERS: usize = 100_000;
    let engine = reference_engine();
    let messages = traffic(Format::Native);
    let mut changes = Vec::new();
    for message in &messages {
        engine.apply(&parse_event(message, 1 << 16).unwrap(), &mut changes);
    }
    let mut states = Vec::new();
    engine
        .store()
        .for_each(|_, state| states.push(state.clone()));
    let fingerprint = engine.rules().fingerprint;
    let records: Vec<(String, Vec<u8>)> = (0..CUSTOMERS)
        .map(|i| {
            let snapshot = Snapshot::new(
                fingerprint,
                vec![("clickstream".into(), i as i64)],
                states[i % states.len()].clone(),
            );
            (format!("customer-{i}"), encode(&snapshot))
        })
        .collect();
    let bytes: usize = records.iter().map(|(_, v)| v.len()).sum();
    println!(
        "restore: {CUSTOMERS} records, {} bytes on average",
        bytes / CUSTOMERS
    );
    let mut group = c.benchmark_group("restore");
    group.throughput(Throughput::Elements(CUSTOMERS as u64));
    group.sample_size(10);
    group.bench_function("load_100k_customers", |b| {
        b.iter_batched(
            reference_engine,
            |engine| {
                let committed = [("clickstream".to_owned(), i64::MAX)].into();
                let mut loader = Loader::new(&engine, 0, committed);
                for (offset, (key, value)) in records.iter().enumerate() {
                    loader.load(key.as_bytes(), value, offset as i64);
                }
                black_box(loader.finish());
                engine
            },
            criterion::BatchSize::LargeInput,
        )
    });
    // The other half of the changelog: encoding a checkpoint's states (on the encoder
    // thread, once per commit interval for every customer changed in it). Here the
    // states repeat every 5,000 and stay in the cache.
    group.bench_function("encode_100k_customers", |b| {
        b.iter(|| {
            for i in 0..CUSTOMERS {
                black_box(encode(&states[i % states.len()]));
            }
        })
    });
    // The same encoding as the service meets it: 100,000 distinct states (deep copies),
    // visited in a scattered order, so that each is cold in the cache as the changelog's
    // encoder finds a customer changed about a second before.
    let copies: Vec<CustomerState> = (0..CUSTOMERS)
        .map(|i| states[i % states.len()].clone())
        .collect();
    group.bench_function("encode_100k_customers_cold", |b| {
        b.iter(|| {
            for i in 0..CUSTOMERS {
                black_box(encode(&copies[i * 7_919 % CUSTOMERS]));
            }
        })
    });
    // As the changelog does it: read from the store by id; and, as its checkpoints that
    // someone waits for do, with the memory of customers a few ahead asked for meanwhile
    // (`CustomerStore::with_prefetch`).
    let store = new_store();
    for (i, state) in copies.into_iter().enumerate() {
        store.insert(format!("customer-{i}").into(), state);
    }
    let mut ids: Vec<String> = (0..CUSTOMERS)
        .map(|i| format!("customer-{}", i * 7_919 % CUSTOMERS))
        .collect();
    group.bench_function("encode_100k_customers_from_the_store", |b| {
        b.iter(|| {
            for id in &ids {
                black_box(store.read(id, encode));
            }
        })
    });
    group.bench_function("encode_100k_customers_from_the_store_prefetched", |b| {
        b.iter(|| {
            store.with_prefetch(&mut ids, |id| {
                black_box(store.read(id, encode));
            })
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    parsing,
    per_event_path,
    state_and_rules,
    rule_count,
    timers,
    restore
);
criterion_main!(benches);
