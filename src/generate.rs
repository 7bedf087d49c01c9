//! Realistic synthetic traffic, for the demo, `segmentd generate`, tests and benches.
//!
//! A seeded, deterministic simulation of a shop: customers with heavy-tailed activity
//! (a few very active, most rarely seen), each with a device, a country and a campaign
//! source; browsing sessions of page views, searches and product views; carts filled and
//! emptied; purchases of the cart with items and revenue; exit intents; `identify` calls
//! with demographic or firmographic traits. Output is either input format, or both mixed,
//! optionally with a share of deliberately malformed messages.

use serde_json::{Value, json};

use crate::time::{Millis, SECOND, format_timestamp};

/// Which input format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// segmentd's native format.
    Native,
    /// The Segment / RudderStack spec.
    Segment,
    /// Each message randomly one or the other.
    Mixed,
}

/// Generator settings.
#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    /// Seed: the same seed gives the same traffic.
    pub seed: u64,
    /// How many distinct customers.
    pub customers: u32,
    /// Output format.
    pub format: Format,
    /// Share of messages that are malformed (0.0–1.0), to exercise the dead-letter path.
    pub invalid_share: f64,
}

/// One generated message: the Kafka key (customer id), the payload and its event time.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The customer id, used as the message key.
    pub key: String,
    /// The JSON payload.
    pub payload: Vec<u8>,
    /// The event time written in it.
    pub ts: Millis,
}

const CATEGORIES: [&str; 8] = [
    "running",
    "shoes",
    "tennis",
    "outdoor",
    "fitness",
    "apparel",
    "electronics",
    "books",
];
const COUNTRIES: [(&str, &[&str]); 6] = [
    ("DE", &["Berlin", "Munich", "Hamburg"]),
    ("US", &["New York", "Austin", "Seattle"]),
    ("FR", &["Paris", "Lyon"]),
    ("GB", &["London", "Leeds"]),
    ("NL", &["Amsterdam"]),
    ("ES", &["Madrid", "Valencia"]),
];
const SOURCES: [&str; 5] = ["email", "google", "facebook", "direct", "affiliate"];
const PRODUCTS: u32 = 400;

/// SplitMix64: a tiny, fast, seedable generator, good enough for simulated shoppers and
/// stable across versions (unlike a library's default RNG).
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What the simulation remembers per customer.
#[derive(Clone, Debug, Default)]
struct Shopper {
    session: u32,
    last_ts: Millis,
    cart: Vec<u32>,
    identified: bool,
    orders: u32,
}

/// The traffic generator.
pub struct Generator {
    config: GeneratorConfig,
    rng: Rng,
    shoppers: Vec<Shopper>,
    sequence: u64,
}

impl Generator {
    /// A generator with `config`.
    pub fn new(config: GeneratorConfig) -> Self {
        let shoppers = vec![Shopper::default(); config.customers.max(1) as usize];
        Generator {
            rng: Rng(config.seed),
            config,
            shoppers,
            sequence: 0,
        }
    }

    /// The next message, stamped with event time `ts`.
    pub fn next_at(&mut self, ts: Millis) -> Generated {
        self.sequence += 1;
        // Heavy-tailed activity: low customer numbers are picked far more often.
        let n = self.shoppers.len() as f64;
        let index = ((self.rng.unit().powf(2.5) * n) as usize).min(self.shoppers.len() - 1);
        let key = format!("c-{index}");
        if self.rng.unit() < self.config.invalid_share {
            return Generated {
                payload: self.malformed(&key, ts),
                key,
                ts,
            };
        }
        let (event_type, properties) = self.action(index, ts);
        let segment_format = match self.config.format {
            Format::Native => false,
            Format::Segment => true,
            Format::Mixed => self.rng.below(2) == 0,
        };
        let payload = self.render(index, &key, ts, event_type, properties, segment_format);
        Generated { key, payload, ts }
    }

    /// Picks what customer `index` does next and updates the simulation.
    fn action(&mut self, index: usize, ts: Millis) -> (&'static str, Value) {
        let rng = &mut self.rng;
        let shopper = &mut self.shoppers[index];
        if ts - shopper.last_ts > 30 * 60 * SECOND || shopper.session == 0 {
            shopper.session += 1;
            shopper.last_ts = ts;
            return (
                "page_view",
                json!({"path": "/", "referrer": *rng.pick(&SOURCES)}),
            );
        }
        shopper.last_ts = ts;
        let product = |rng: &mut Rng| rng.below(u64::from(PRODUCTS)) as u32;
        let roll = rng.below(100);
        match roll {
            0..=24 => (
                "page_view",
                json!({"path": format!("/c/{}", rng.pick(&CATEGORIES))}),
            ),
            25..=54 => {
                // Interest is skewed: each shopper prefers one category.
                let p = if rng.below(3) == 0 {
                    (index as u32 * 7 + rng.below(5) as u32 * 8) % PRODUCTS
                } else {
                    product(rng)
                };
                ("product_view", product_json(p))
            }
            55..=61 => ("search", json!({"query": rng.pick(&CATEGORIES)})),
            62..=73 => {
                let p = product(rng);
                shopper.cart.push(p);
                let mut properties = product_json(p);
                properties["quantity"] = json!(1 + rng.below(2));
                ("add_to_cart", properties)
            }
            74..=76 if !shopper.cart.is_empty() => {
                let p = shopper
                    .cart
                    .remove(rng.below(shopper.cart.len() as u64) as usize);
                ("remove_from_cart", json!({"product_id": product_id(p)}))
            }
            77..=80 if !shopper.cart.is_empty() => (
                "checkout_started",
                json!({"item_count": shopper.cart.len()}),
            ),
            81..=85 if !shopper.cart.is_empty() => {
                shopper.orders += 1;
                let items: Vec<Value> = shopper
                    .cart
                    .drain(..)
                    .map(|p| {
                        let mut line = product_json(p);
                        line["quantity"] = json!(1);
                        line
                    })
                    .collect();
                let revenue: f64 = items
                    .iter()
                    .map(|i| i["price"].as_f64().unwrap_or(0.0))
                    .sum();
                let order = format!("o-{index}-{}", shopper.orders);
                (
                    "purchase",
                    json!({"order_id": order, "revenue": round2(revenue), "currency": "EUR", "items": items}),
                )
            }
            86..=92 => ("exit_intent", json!({"page": "/cart"})),
            93..=94 if !shopper.identified => {
                shopper.identified = true;
                ("identify", Value::Null)
            }
            95 => ("newsletter_signup", json!({"list": "weekly"})),
            _ => ("page_view", json!({"path": "/"})),
        }
    }

    fn render(
        &self,
        index: usize,
        key: &str,
        ts: Millis,
        event_type: &str,
        properties: Value,
        segment_format: bool,
    ) -> Vec<u8> {
        // A shopper's device, country and campaign are fixed by their number.
        let (country, cities) = COUNTRIES[index % COUNTRIES.len()];
        let city = cities[index % cities.len()];
        let device = ["mobile", "mobile", "mobile", "desktop", "desktop", "tablet"][index % 6];
        let source = SOURCES[index % SOURCES.len()];
        let session = format!("s-{index}-{}", self.shoppers[index].session);
        let event_id = format!("e-{:x}-{}", self.config.seed, self.sequence);
        let gender = ["f", "m", "x"][index % 3];
        let income_band = ["low", "mid", "high"][index % 3];
        let industry = ["retail", "software", "finance"][index % 3];
        let company_size = ["1-10", "10-50", "50-200", "200+"][index % 4];
        let traits = json!({
            "age": 18 + (index % 60),
            "gender": gender,
            "income_band": income_band,
            "company": format!("Company {}", index % 50),
            "industry": industry,
            "company_size": company_size,
        });
        let value = if segment_format {
            let (call, name) = match event_type {
                "page_view" => ("page", None),
                "identify" => ("identify", None),
                "product_view" => ("track", Some("Product Viewed")),
                "add_to_cart" => ("track", Some("Product Added")),
                "remove_from_cart" => ("track", Some("Product Removed")),
                "checkout_started" => ("track", Some("Checkout Started")),
                "purchase" => ("track", Some("Order Completed")),
                "search" => ("track", Some("Products Searched")),
                "exit_intent" => ("track", Some("Exit Intent")),
                _ => ("track", Some("Newsletter Signup")),
            };
            let mut properties = properties;
            if let Some(items) = properties.get_mut("items").map(Value::take) {
                properties["products"] = items;
            }
            if properties.is_object() {
                properties["session_id"] = json!(session);
            }
            let mut message = json!({
                "type": call,
                "messageId": event_id,
                "userId": key,
                "timestamp": format_timestamp(ts),
                "context": {
                    "device": {"type": device},
                    "location": {"country": country, "city": city},
                    "campaign": {"source": source},
                    "userAgent": "Mozilla/5.0 (segmentd generator)",
                },
            });
            if let Some(name) = name {
                message["event"] = json!(name);
            }
            if event_type == "identify" {
                message["traits"] = traits;
            } else {
                message["properties"] = properties;
            }
            message
        } else {
            let mut message = json!({
                "event_id": event_id,
                "type": event_type,
                "customer_id": key,
                "ts": format_timestamp(ts),
                "session_id": session,
                "context": {"device": device, "country": country, "city": city, "utm_source": source},
            });
            if event_type == "identify" {
                message["traits"] = traits;
            } else {
                message["properties"] = properties;
            }
            message
        };
        serde_json::to_vec(&value).expect("JSON values always serialise")
    }

    /// A malformed message of a random kind.
    fn malformed(&mut self, key: &str, ts: Millis) -> Vec<u8> {
        let when = format_timestamp(ts);
        match self.rng.below(6) {
            0 => b"{\"type\": \"page_view\", \"customer_id\": ".to_vec(),
            1 => format!(r#"{{"type":"page_view","ts":"{when}"}}"#).into_bytes(),
            2 => format!(r#"{{"type":"page_view","customer_id":"{key}","ts":"not a time"}}"#)
                .into_bytes(),
            3 => format!(r#"{{"type":"page_view","customer_id":42,"ts":"{when}"}}"#).into_bytes(),
            4 => b"[\"an\", \"array\"]".to_vec(),
            _ => format!(r#"{{"customer_id":"{key}","ts":"{when}"}}"#).into_bytes(),
        }
    }
}

fn product_id(p: u32) -> String {
    format!("p-{p}")
}

fn product_json(p: u32) -> Value {
    let category = CATEGORIES[(p as usize) % CATEGORIES.len()];
    // Heavy-tailed prices: most products are cheap, a few expensive.
    let price = 5.0 + f64::from((p * 7919) % 100).powf(2.2) / 40.0;
    json!({"product_id": product_id(p), "category": category, "price": round2(price)})
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `count` segment definitions (`[[segments]]` tables of a config) written over the
/// generator's vocabulary: windowed counts, sums, averages and distincts, filters, `top`,
/// cart and session state, context, `idle`/`within` deadlines and sequences, with
/// thresholds and windows varied (among hundreds a few repeat, as in real configurations).
/// For benchmarks of how the cost grows with the number of rules; every one compiles.
pub fn rules_toml(count: usize) -> String {
    let mut text = String::new();
    for i in 0..count {
        let n = 2 + i % 17;
        let days = [1, 3, 7, 14, 30, 60, 90][i % 7];
        let category = CATEGORIES[i % CATEGORIES.len()];
        let country = COUNTRIES[i % COUNTRIES.len()].0;
        let money = 50 + (i % 23) * 25;
        let rule = match i % 12 {
            0 => format!("count(product_view, {days}d) >= {n}"),
            1 => format!("sum(purchase.revenue, {days}d) >= {money}"),
            2 => format!(
                "cart.items > {} and idle(cart.updated_at) >= {}m",
                i % 3,
                5 + i % 55
            ),
            3 => format!(
                "within(last(exit_intent), {}m) and cart.value > {money}",
                1 + i % 10
            ),
            4 => format!("context.country == '{country}' and count(page_view, {days}d) >= {n}"),
            5 => format!("top(product_view.category, {days}d) == '{category}'"),
            6 => format!(
                "count(purchase) >= {} and idle(last(purchase)) > {days}d",
                1 + i % 4
            ),
            7 => format!("distinct(product_view.product_id, {days}d) >= {n}"),
            8 => format!("count(product_view where category == '{category}', {days}d) >= {n}"),
            9 => format!(
                "not_followed(add_to_cart, purchase, {}h, by = product_id)",
                1 + i % 24
            ),
            10 => {
                format!("context.device == 'mobile' and sum(purchase.revenue, {days}d) > {money}")
            }
            _ => format!("avg(purchase.revenue, {days}d) >= {money} and session.page_views >= {n}"),
        };
        text.push_str(&format!(
            "[[segments]]\nid = \"generated_{i}\"\nenter = \"{rule}\"\n\n"
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event;

    fn generator(format: Format, invalid_share: f64) -> Generator {
        Generator::new(GeneratorConfig {
            seed: 7,
            customers: 500,
            format,
            invalid_share,
        })
    }

    #[test]
    fn generated_rules_all_compile() {
        for count in [1, 20, 100, 1_000] {
            let text = rules_toml(count);
            let config = crate::config::Config::from_toml_only(&text, "generated")
                .unwrap_or_else(|e| panic!("{e}"));
            let rules = config.rule_set().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(rules.segments.len(), count);
        }
    }

    #[test]
    fn every_generated_message_parses_in_either_format() {
        for format in [Format::Native, Format::Segment, Format::Mixed] {
            let mut g = generator(format, 0.0);
            let mut types = std::collections::BTreeSet::new();
            for i in 0..5_000 {
                let message = g.next_at(1_700_000_000_000 + i * 100);
                let event = parse_event(&message.payload, 1 << 16).unwrap_or_else(|e| {
                    panic!("{e}: {}", String::from_utf8_lossy(&message.payload))
                });
                assert_eq!(&*event.customer_id, message.key);
                types.insert(event.event_type.to_string());
            }
            for expected in [
                "page_view",
                "product_view",
                "add_to_cart",
                "purchase",
                "exit_intent",
                "identify",
            ] {
                assert!(
                    types.contains(expected),
                    "{format:?} never produced {expected}: {types:?}"
                );
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_traffic() {
        let mut a = generator(Format::Mixed, 0.1);
        let mut b = generator(Format::Mixed, 0.1);
        for i in 0..1_000 {
            assert_eq!(a.next_at(i).payload, b.next_at(i).payload);
        }
    }

    #[test]
    fn the_requested_share_of_messages_is_malformed() {
        let mut g = generator(Format::Native, 0.1);
        let bad = (0..10_000)
            .filter(|i| parse_event(&g.next_at(*i).payload, 1 << 16).is_err())
            .count();
        assert!((700..1_300).contains(&bad), "{bad} of 10000 malformed");
    }
}
