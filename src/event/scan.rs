//! A fast reader for the JSON that events nearly always are, into the same [`Json`]
//! document serde_json builds.
//!
//! It reads objects, arrays, strings without escapes, literals and plain numbers, and gives
//! up (`None`) on anything else: an escape, a control character, a number serde_json would
//! read differently or refuse (`-0`, twenty digits, `1e400`, `01`), nesting deeper than
//! [`MAX_DEPTH`], any syntax error, anything after the value. The caller then parses the
//! payload with serde_json, which gives the document or the error, so what this accepts it
//! reads exactly as serde_json does (a property test compares the two), and errors and
//! rare forms keep serde_json's own handling.

use std::borrow::Cow;

use super::json::{Json, Number, Object};

/// The deepest nesting read here (serde_json's own limit is 128).
const MAX_DEPTH: usize = 100;

/// Reads `text` as one JSON value, or `None` if it is anything this reader leaves to
/// serde_json.
pub fn document(text: &str) -> Option<Json<'_>> {
    let mut reader = Reader::new(text);
    let value = reader.value(0)?;
    reader.finished().then_some(value)
}

/// A position in the text being read. Besides [`document`], a format's own reader
/// (`native::read_direct`) walks an event's members with it, building the event without a
/// document in between.
pub(super) struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `text`.
    pub(super) fn new(text: &'a str) -> Reader<'a> {
        Reader { text, at: 0 }
    }

    /// Whether only whitespace is left.
    pub(super) fn finished(&mut self) -> bool {
        self.skip_whitespace();
        self.at == self.text.len()
    }

    /// Where the reader is in the text (after [`Reader::peek`]: at the next token).
    pub(super) fn offset(&self) -> usize {
        self.at
    }

    /// The text read since `start`, an earlier [`Reader::offset`] (both at tokens, so at
    /// character boundaries).
    pub(super) fn text_since(&self, start: usize) -> &'a str {
        &self.text[start..self.at]
    }

    /// The text as bytes (every token is ASCII).
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    pub(super) fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.bytes().get(self.at).copied()
    }

    /// Consumes `byte` if it is next (after whitespace).
    fn eat(&mut self, byte: u8) -> bool {
        let next = self.peek() == Some(byte);
        self.at += usize::from(next);
        next
    }

    /// The value at the reader, nested `depth` containers deep (0: the top level).
    pub(super) fn value(&mut self, depth: usize) -> Option<Json<'a>> {
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string().map(|s| Json::Str(Cow::Borrowed(s))),
            b't' => self.literal("true", Json::Bool(true)),
            b'f' => self.literal("false", Json::Bool(false)),
            b'n' => self.literal("null", Json::Null),
            _ => self.number().map(Json::Num),
        }
    }

    fn literal(&mut self, word: &str, value: Json<'a>) -> Option<Json<'a>> {
        let end = self.at + word.len();
        (self.bytes().get(self.at..end)? == word.as_bytes()).then(|| {
            self.at = end;
            value
        })
    }

    fn object(&mut self, depth: usize) -> Option<Json<'a>> {
        let mut members = Vec::with_capacity(8);
        self.members(depth, |reader, key| {
            members.push((Cow::Borrowed(key), reader.value(depth)?));
            Some(())
        })?;
        Some(Json::Object(Object::from_members(members)))
    }

    /// Reads the object at the reader, `depth` containers deep counting itself: hands each
    /// member's key to `each` with the reader at the member's value, which `each` must read
    /// (at `depth`). `None` if the object is malformed, too deep, or `each` gives up.
    pub(super) fn members(
        &mut self,
        depth: usize,
        mut each: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        if depth > MAX_DEPTH || !self.eat(b'{') {
            return None;
        }
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.string()?;
            if !self.eat(b':') {
                return None;
            }
            each(self, key)?;
            if self.eat(b'}') {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    fn array(&mut self, depth: usize) -> Option<Json<'a>> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.at += 1; // '['
        let mut values = Vec::new();
        if !self.eat(b']') {
            loop {
                values.push(self.value(depth)?);
                if self.eat(b']') {
                    break;
                }
                if !self.eat(b',') {
                    return None;
                }
            }
        }
        Some(Json::Array(values))
    }

    /// A string without escapes or control characters, at the opening quote; returns its
    /// contents.
    pub(super) fn string(&mut self) -> Option<&'a str> {
        let start = self.at + 1;
        let end = start + find_quote_escape_or_control(&self.bytes()[start..])?;
        if self.bytes()[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        // Both ends are ASCII, so they are character boundaries of the text.
        self.text.get(start..end)
    }

    /// A number as serde_json reads it: an integer of up to 18 digits exactly (not `-0`,
    /// which serde_json reads as a float), anything with a fraction or an exponent as the
    /// nearest `f64` (finite).
    fn number(&mut self) -> Option<Number> {
        let start = self.at;
        let negative = self.bytes()[start] == b'-';
        let mut at = start + usize::from(negative);
        let digits = |at: &mut usize| {
            let from = *at;
            while self.bytes().get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at - from
        };
        let whole = digits(&mut at);
        if whole == 0 || (whole > 1 && self.bytes()[start + usize::from(negative)] == b'0') {
            return None;
        }
        let mut integer = true;
        if self.bytes().get(at) == Some(&b'.') {
            at += 1;
            if digits(&mut at) == 0 {
                return None;
            }
            integer = false;
        }
        if let Some(b'e' | b'E') = self.bytes().get(at) {
            at += 1;
            if let Some(b'+' | b'-') = self.bytes().get(at) {
                at += 1;
            }
            if digits(&mut at) == 0 {
                return None;
            }
            integer = false;
        }
        let lexeme = &self.text[start..at];
        let number = if integer {
            if whole > 18 {
                return None;
            }
            let magnitude: u64 = lexeme.trim_start_matches('-').parse().ok()?;
            match (negative, magnitude) {
                (false, n) => Number::Positive(n),
                (true, 0) => return None,
                (true, n) => Number::Negative(-(n as i64)),
            }
        } else {
            let x: f64 = lexeme.parse().ok()?;
            if !x.is_finite() {
                return None;
            }
            Number::Float(x)
        };
        self.at = at;
        Some(number)
    }
}

/// The index in `bytes` of the first `"`, `\` or control character (below 0x20), eight
/// bytes at a time.
fn find_quote_escape_or_control(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    /// The high bit of each byte of `v` that is zero — exact for the lowest such byte,
    /// which is all that is read here.
    fn zero_bytes(v: u64) -> u64 {
        v.wrapping_sub(ONES) & !v & HIGH
    }
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let v = u64::from_le_bytes(chunk.try_into().ok()?);
        let found = zero_bytes(v ^ (ONES * u64::from(b'"')))
            | zero_bytes(v ^ (ONES * u64::from(b'\\')))
            | (v.wrapping_sub(ONES * 0x20) & !v & HIGH);
        if found != 0 {
            return Some(offset + found.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| offset + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// serde_json's document of `text`, through the same visitor the service falls back to.
    fn by_serde(text: &str) -> Option<Json<'_>> {
        serde_json::from_str(text).ok()
    }

    /// What this reader accepts, serde_json reads the same.
    fn agrees(text: &str) -> Result<(), TestCaseError> {
        if let Some(fast) = document(text) {
            prop_assert_eq!(Some(fast), by_serde(text), "{}", text);
        }
        Ok(())
    }

    #[test]
    fn events_are_read_here_and_rare_forms_left_to_serde_json() {
        let event = r#" {"type":"purchase","customer_id":"c-1","ts":"2026-11-23T10:21:14.123Z",
            "properties":{"revenue":120.5,"n":-3,"big":123456789012345678,"e":1e3,
            "ok":true,"no":false,"none":null,"items":[{"price":1.25},[]],"empty":{}}} "#;
        assert_eq!(document(event), by_serde(event));
        assert!(document(event).is_some());
        for rare in [
            r#""tab\tbed""#,
            "-0",
            "12345678901234567890",
            "1e400",
            "01",
            "1.",
            ".5",
            "[1,]",
            r#"{"a":1,}"#,
            "{} x",
            "\"raw\u{1}control\"",
            "tru",
            "",
        ] {
            assert_eq!(document(rare), None, "{rare}");
        }
        let deep = format!("{}{}", "[".repeat(120), "]".repeat(120));
        assert_eq!(document(&deep), None);
    }

    #[test]
    fn the_first_special_byte_is_found_at_every_offset() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x1f, 0x00] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = special;
                    if at + 1 < len {
                        bytes[at + 1] = b'"';
                    }
                    assert_eq!(find_quote_escape_or_control(&bytes), Some(at));
                }
            }
            assert_eq!(find_quote_escape_or_control(&vec![0xe9; len]), None);
        }
    }

    /// JSON text of arbitrary values, with arbitrary whitespace between tokens.
    fn json_text() -> impl Strategy<Value = String> {
        let ws = "[ \t\r\n]{0,2}";
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|x| format!("{x:e}")),
            any::<f64>().prop_map(|x| x.to_string()),
            "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{1,5})?([eE][+-]?[0-9]{1,3})?",
            "\"([a-zé€ \\\\\"/]|\\\\[nt\"u]|\u{1}){0,12}\"",
        ];
        leaf.prop_recursive(4, 32, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec((ws, inner.clone(), ws), 0..6).prop_map(|items| {
                    let items: Vec<String> = items
                        .into_iter()
                        .map(|(a, v, b)| format!("{a}{v}{b}"))
                        .collect();
                    format!("[{}]", items.join(","))
                }),
                proptest::collection::vec(("[a-c]{1,2}", ws, inner), 0..6).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, w, v)| format!("\"{k}\"{w}:{w}{v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn what_it_reads_serde_json_reads_the_same(text in json_text()) {
            agrees(&text)?;
        }

        #[test]
        fn damaged_text_is_never_read_differently(
            text in json_text(),
            cut in any::<proptest::sample::Index>(),
            insert in "[\\[\\]{},:\"0-9a-z .eE+-]",
        ) {
            let mut at = cut.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            agrees(&text[..at])?;
            agrees(&format!("{}{}{}", &text[..at], insert, &text[at..]))?;
        }
    }
}
