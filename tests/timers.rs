//! Timers in `run`, against a broker: a timer fires when its partition's watermark passes
//! the deadline — moved on by later events on the partition, or, once the partition has
//! gone idle, by the wall clock. The service's wall clock is a manual one the test moves:
//! no test waits for real time to pass.

mod common;

use std::time::Duration;

use common::*;
use segmentd::time::{MINUTE, SECOND, WallClock, format_timestamp, parse_timestamp};

/// Proves that a cart abandoned at T enters `cart_abandoner` at exactly T+30m when a later
/// event on the same partition moves the watermark past it, and that `abandoned_product`
/// (due at T+1h) fires with no further event once the partition is idle and the wall
/// clock passes the deadline plus the allowed lateness — each with cause `timer` and `at`
/// the deadline, while the metrics count the timers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_on_the_watermark_and_on_an_idle_partition() {
    let mock = embedded_broker(1, 1);
    let brokers = mock.bootstrap_servers();
    let t = parse_timestamp("2026-07-01T12:00:00Z").unwrap();
    let clock = WallClock::manual(t);
    let mut config = test_config(&brokers, INPUT, "timers-test");
    config.time.allowed_lateness = "5s".parse().unwrap();
    config.time.idle_timeout = "10s".parse().unwrap();
    let service = Service::start_with_clock(config, clock.clone()).await;
    service.ready().await;

    let producer = producer(&brokers);
    let event = |id: &str, customer: &str, at: i64, body: &str| {
        format!(
            r#"{{"event_id":"{id}","customer_id":"{customer}","ts":"{}",{body}}}"#,
            format_timestamp(at)
        )
    };
    let cart = r#""type":"add_to_cart","properties":{"product_id":"p-1","price":20.0}"#;
    produce(
        &producer,
        INPUT,
        Some("c-1"),
        event("a", "c-1", t, cart).as_bytes(),
    )
    .await;
    // Another customer's event 31 minutes later: the watermark (31m − 5s) passes T+30m.
    let view = r#""type":"page_view""#;
    let later = t + 31 * MINUTE;
    produce(
        &producer,
        INPUT,
        Some("c-2"),
        event("b", "c-2", later, view).as_bytes(),
    )
    .await;

    let records = read_records(&brokers, OUTPUT, 1, Duration::from_secs(30)).await;
    let abandoned = records[0].json();
    assert_eq!(abandoned["customer_id"], "c-1");
    assert_eq!(abandoned["segment"], "cart_abandoner");
    assert_eq!(abandoned["cause"], serde_json::json!({"kind": "timer"}));
    assert_eq!(abandoned["at"], format_timestamp(t + 30 * MINUTE));
    assert_eq!(abandoned["cart"][0]["product_id"], "p-1");

    // Nothing else is due until T+1h (and 1 ms); the wall clock, once the partition has
    // been idle for 10 s, moves the watermark to the clock minus the lateness: T+1h+1s.
    clock.set(t + 60 * MINUTE + 6 * SECOND);
    let records = read_records(&brokers, OUTPUT, 2, Duration::from_secs(30)).await;
    let product = records[1].json();
    assert_eq!(product["customer_id"], "c-1");
    assert_eq!(product["segment"], "abandoned_product");
    assert_eq!(product["cause"], serde_json::json!({"kind": "timer"}));
    assert_eq!(product["at"], format_timestamp(t + 60 * MINUTE + 1));
    assert_eq!(product["seq"], 2);

    let http = service.http;
    wait_for("timer metrics", Duration::from_secs(10), async || {
        let (_, metrics) = http_get(http, "/metrics").await;
        let has = |line: &str| metrics.lines().any(|l| l == line);
        let watermark = format!(
            "segmentd_watermark_seconds{{partition=\"0\"}} {}",
            (t + 60 * MINUTE + SECOND) / 1000
        );
        (has("segmentd_timers_fired_total 2")
            && has("segmentd_timers_pending 0")
            && has(&watermark))
        .then_some(())
    })
    .await;
    service.stop().await.expect("a clean shutdown");
}

/// Proves `time.order = "event_time"`: one customer's events arriving out of order within
/// the lateness are held until the watermark passes them and applied in event-time order
/// (the exit intent after the add to cart, so the change is caused by the exit intent);
/// their offsets are committed once applied and delivered; an event still held at
/// shutdown is not committed, so it is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_time_order_applies_held_events_in_time_order() {
    let mock = embedded_broker(1, 1);
    let brokers = mock.bootstrap_servers();
    let t = parse_timestamp("2026-07-02T09:00:00Z").unwrap();
    let clock = WallClock::manual(t);
    let group = "event-time-test";
    let mut config = test_config(&brokers, INPUT, group);
    config.time.allowed_lateness = "5s".parse().unwrap();
    config.time.idle_timeout = "10s".parse().unwrap();
    config.time.order = segmentd::config::EventOrder::EventTime;
    let service = Service::start_with_clock(config, clock.clone()).await;
    service.ready().await;

    let producer = producer(&brokers);
    let send = async |id: &str, at: i64, body: &str| {
        let json = format!(
            r#"{{"event_id":"{id}","customer_id":"c-1","ts":"{}",{body}}}"#,
            format_timestamp(at)
        );
        produce(&producer, INPUT, Some("c-1"), json.as_bytes()).await;
    };
    // Arrival order: the exit intent (T+2s) before the add to cart (T+1s).
    send("x", t + 2 * SECOND, r#""type":"exit_intent""#).await;
    send(
        "a",
        t + SECOND,
        r#""type":"add_to_cart","properties":{"product_id":"p-1","price":9.5}"#,
    )
    .await;
    // Another customer's page view at T+3s: once the watermark shows it (T+3s − 5s), all
    // three were read — and, still within the lateness, none was applied.
    let view = format!(
        r#"{{"event_id":"o","customer_id":"c-9","ts":"{}","type":"page_view"}}"#,
        format_timestamp(t + 3 * SECOND)
    );
    produce(&producer, INPUT, Some("c-9"), view.as_bytes()).await;
    let http = service.http;
    let watermark_line = |at: i64| {
        format!(
            "segmentd_watermark_seconds{{partition=\"0\"}} {}",
            at / 1000
        )
    };
    wait_for("three events read", Duration::from_secs(30), async || {
        let (_, metrics) = http_get(http, "/metrics").await;
        let expected = watermark_line(t - 2 * SECOND);
        metrics.lines().any(|l| l == expected).then_some(())
    })
    .await;
    assert_eq!(
        committed_offset(&brokers, group, INPUT, 0),
        None,
        "held, not committed"
    );
    // Idle: the watermark follows the clock past the events, which apply in time order.
    clock.set(t + 20 * SECOND);
    let records = read_records(&brokers, OUTPUT, 1, Duration::from_secs(30)).await;
    let change = records[0].json();
    assert_eq!(change["segment"], "exit_intent_with_cart");
    assert_eq!(change["at"], format_timestamp(t + 2 * SECOND));
    assert_eq!(
        change["cause"]["event_id"], "x",
        "applied after the add to cart"
    );
    wait_for(
        "the offsets committed",
        Duration::from_secs(30),
        async || (committed_offset(&brokers, group, INPUT, 0) == Some(3)).then_some(()),
    )
    .await;

    // A fourth event, held (the clock stands still) when the service stops.
    send("v", t + 25 * SECOND, r#""type":"page_view""#).await;
    wait_for("the last event read", Duration::from_secs(30), async || {
        let (_, metrics) = http_get(http, "/metrics").await;
        let expected = watermark_line(t + 20 * SECOND);
        metrics.lines().any(|l| l == expected).then_some(())
    })
    .await;
    service.stop().await.expect("a clean shutdown");
    assert_eq!(
        committed_offset(&brokers, group, INPUT, 0),
        Some(3),
        "the held event is read again"
    );
}
