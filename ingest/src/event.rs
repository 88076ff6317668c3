//! Decoding and validation of CloudEvents request bodies.
//!
//! A body is split into raw events without copying (`&RawValue` borrowed from the body), then
//! each event's fields are checked. Every problem is reported with the event's index, the field
//! and the reason; one bad event rejects the whole request, so a client never has to find out
//! which half of a batch was taken.

use chrono::{DateTime, NaiveDateTime};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Longest `id`, `source`, `type` or `subject` accepted.
pub const MAX_ATTRIBUTE_LEN: usize = 256;

/// The body layouts the endpoint takes, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/cloudevents+json`: one event.
    Single,
    /// `application/cloudevents-batch+json`: a JSON array of events.
    Batch,
    /// `application/x-ndjson`: one event per line.
    Ndjson,
    /// `application/json`: one event or an array (what a plain HTTP client sends).
    Json,
}

impl BodyFormat {
    /// The format for a `Content-Type` header value (parameters such as `charset` ignored).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let mime = ct.split(';').next().unwrap_or("").trim();
        match mime.to_ascii_lowercase().as_str() {
            "application/cloudevents+json" => Some(Self::Single),
            "application/cloudevents-batch+json" => Some(Self::Batch),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Some(Self::Ndjson)
            }
            "application/json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// One validated event, borrowing from the request body where it can.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub id: Cow<'a, str>,
    pub source: Cow<'a, str>,
    pub ty: Cow<'a, str>,
    pub subject: Cow<'a, str>,
    /// Event time, Unix nanoseconds UTC.
    pub time_unix_nanos: i64,
    /// The `data` object's JSON text exactly as sent; `None` when absent or null.
    pub data: Option<&'a str>,
}

/// One problem with one event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub index: usize,
    pub field: &'static str,
    pub reason: String,
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// The body as a whole cannot be read (not UTF-8, not JSON, wrong shape).
    Malformed(String),
    /// No events at all.
    Empty,
    /// More events than allowed.
    TooManyEvents { count: usize, max: usize },
    /// Some events are invalid; none is taken.
    Invalid(Vec<Problem>),
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_events: usize,
    pub max_event_bytes: usize,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    specversion: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    source: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "type")]
    ty: Option<&'a RawValue>,
    #[serde(borrow, default)]
    subject: Option<&'a RawValue>,
    #[serde(borrow, default)]
    time: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Splits and validates a body. `body` must already be decompressed.
pub fn decode(
    body: &[u8],
    format: BodyFormat,
    limits: DecodeLimits,
) -> Result<Vec<Event<'_>>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        BodyError::Malformed(format!(
            "body is not valid UTF-8 (first bad byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    // Each entry is one event position: its raw JSON, or why the line could not be parsed
    // (NDJSON only; in the other formats a syntax error spoils the whole body).
    let raws: Vec<Result<&RawValue, String>> = match format {
        BodyFormat::Single => vec![Ok(single(text)?)],
        BodyFormat::Batch => array(text)?.into_iter().map(Ok).collect(),
        BodyFormat::Json => {
            if text.trim_start().starts_with('[') {
                array(text)?.into_iter().map(Ok).collect()
            } else {
                vec![Ok(single(text)?)]
            }
        }
        BodyFormat::Ndjson => {
            let lines = text.split('\n').map(str::trim).filter(|l| !l.is_empty());
            let count = lines.clone().count();
            if count > limits.max_events {
                return Err(BodyError::TooManyEvents {
                    count,
                    max: limits.max_events,
                });
            }
            lines
                .map(|l| {
                    serde_json::from_str::<&RawValue>(l).map_err(|e| format!("malformed JSON: {e}"))
                })
                .collect()
        }
    };
    if raws.is_empty() {
        return Err(BodyError::Empty);
    }
    if raws.len() > limits.max_events {
        return Err(BodyError::TooManyEvents {
            count: raws.len(),
            max: limits.max_events,
        });
    }
    let mut problems = Vec::new();
    let mut events = Vec::with_capacity(raws.len());
    for (index, raw) in raws.into_iter().enumerate() {
        match raw {
            Ok(raw) => {
                if let Some(e) = event(raw, index, limits.max_event_bytes, &mut problems) {
                    events.push(e);
                }
            }
            Err(reason) => push(&mut problems, index, "", reason),
        }
    }
    if problems.is_empty() {
        Ok(events)
    } else {
        Err(BodyError::Invalid(problems))
    }
}

fn single(text: &str) -> Result<&RawValue, BodyError> {
    let raw: &RawValue = serde_json::from_str(text)
        .map_err(|e| BodyError::Malformed(format!("malformed JSON: {e}")))?;
    if !raw.get().starts_with('{') {
        return Err(BodyError::Malformed(
            "expected one CloudEvent (a JSON object); send arrays as application/cloudevents-batch+json".into(),
        ));
    }
    Ok(raw)
}

fn array(text: &str) -> Result<Vec<&RawValue>, BodyError> {
    if !text.trim_start().starts_with('[') {
        return Err(BodyError::Malformed(
            "expected a JSON array of CloudEvents".into(),
        ));
    }
    serde_json::from_str(text).map_err(|e| BodyError::Malformed(format!("malformed JSON: {e}")))
}

fn event<'a>(
    raw: &'a RawValue,
    index: usize,
    max_bytes: usize,
    problems: &mut Vec<Problem>,
) -> Option<Event<'a>> {
    let text = raw.get();
    if text.len() > max_bytes {
        let reason = format!(
            "event is {} bytes, over the limit of {max_bytes}",
            text.len()
        );
        push(problems, index, "", reason);
        return None;
    }
    if !text.starts_with('{') {
        push(problems, index, "", "an event must be a JSON object".into());
        return None;
    }
    let f: Fields<'a> = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            push(problems, index, "", format!("malformed event: {e}"));
            return None;
        }
    };
    let before = problems.len();
    match f.specversion.map(string) {
        None => push(problems, index, "specversion", "is required".into()),
        Some(Ok(v)) if v == "1.0" => {}
        Some(Ok(v)) => push(
            problems,
            index,
            "specversion",
            format!("must be \"1.0\", got {v:?}"),
        ),
        Some(Err(r)) => push(problems, index, "specversion", r),
    }
    let id = attribute(problems, index, "id", f.id);
    let source = attribute(problems, index, "source", f.source);
    let ty = attribute(problems, index, "type", f.ty);
    let subject = attribute(problems, index, "subject", f.subject);
    let time = match f.time.map(string) {
        None => {
            push(problems, index, "time", "is required".into());
            None
        }
        Some(Err(r)) => {
            push(problems, index, "time", r);
            None
        }
        Some(Ok(t)) => match parse_time(&t) {
            Ok(n) => Some(n),
            Err(r) => {
                push(problems, index, "time", r);
                None
            }
        },
    };
    let data = match f.data {
        None => None,
        Some(d) if d.get() == "null" => None,
        Some(d) if d.get().starts_with('{') => Some(d.get()),
        Some(_) => {
            push(problems, index, "data", "must be a JSON object".into());
            None
        }
    };
    if problems.len() > before {
        return None;
    }
    Some(Event {
        id: id?,
        source: source?,
        ty: ty?,
        subject: subject?,
        time_unix_nanos: time?,
        data,
    })
}

fn push(problems: &mut Vec<Problem>, index: usize, field: &'static str, reason: String) {
    problems.push(Problem {
        index,
        field,
        reason,
    });
}

fn attribute<'a>(
    problems: &mut Vec<Problem>,
    index: usize,
    field: &'static str,
    raw: Option<&'a RawValue>,
) -> Option<Cow<'a, str>> {
    let reason = match raw.map(string) {
        None => "is required".to_string(),
        Some(Err(r)) => r,
        Some(Ok(s)) if s.is_empty() => "must not be empty".to_string(),
        Some(Ok(s)) if s.chars().count() > MAX_ATTRIBUTE_LEN => {
            format!("is longer than {MAX_ATTRIBUTE_LEN} characters")
        }
        Some(Ok(s)) => return Some(s),
    };
    push(problems, index, field, reason);
    None
}

/// A JSON string's value, borrowed when it has no escapes.
fn string(raw: &RawValue) -> Result<Cow<'_, str>, String> {
    let text = raw.get();
    if !text.starts_with('"') {
        return Err(format!("must be a string, got {}", kind(text)));
    }
    if let Ok(s) = serde_json::from_str::<&str>(text) {
        return Ok(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(text)
        .map(Cow::Owned)
        .map_err(|e| format!("is not a valid JSON string: {e}"))
}

fn kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// RFC 3339 with an explicit offset (`Z` or `±hh:mm`) to Unix nanoseconds UTC.
fn parse_time(t: &str) -> Result<i64, String> {
    match DateTime::parse_from_rfc3339(t) {
        Ok(dt) => dt
            .timestamp_nanos_opt()
            .ok_or_else(|| format!("{t:?} is outside the supported range (years 1678 to 2261)")),
        Err(_) => {
            let no_offset = NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f").is_ok()
                || NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").is_ok();
            if no_offset {
                Err(format!(
                    "{t:?} has no UTC offset; RFC 3339 needs Z or ±hh:mm, e.g. 2026-01-02T03:04:05Z"
                ))
            } else {
                Err(format!(
                    "{t:?} is not an RFC 3339 timestamp, e.g. 2026-01-02T03:04:05Z"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_events: 3,
        max_event_bytes: 400,
    };

    fn ev(id: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"t","subject":"c","time":"2026-01-02T03:04:05.5+01:00","data":{{"n":"1.50"}}}}"#
        )
    }

    #[test]
    fn decodes_each_format() {
        let one = ev("a");
        let e = decode(one.as_bytes(), BodyFormat::Single, LIMITS).expect("single");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].id, "a");
        assert_eq!(e[0].data, Some(r#"{"n":"1.50"}"#));
        assert_eq!(e[0].time_unix_nanos, 1_767_319_445_500_000_000);
        let batch = format!("[{},{}]", ev("a"), ev("b"));
        assert_eq!(
            decode(batch.as_bytes(), BodyFormat::Batch, LIMITS)
                .expect("batch")
                .len(),
            2
        );
        let nd = format!("{}\n\n{}\n", ev("a"), ev("b"));
        assert_eq!(
            decode(nd.as_bytes(), BodyFormat::Ndjson, LIMITS)
                .expect("ndjson")
                .len(),
            2
        );
        assert_eq!(
            decode(batch.as_bytes(), BodyFormat::Json, LIMITS)
                .expect("json")
                .len(),
            2
        );
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let body = ev("a\\u00e9");
        let e = decode(body.as_bytes(), BodyFormat::Single, LIMITS).expect("single");
        assert_eq!(e[0].id, "aé");
    }

    #[test]
    fn reports_every_problem_with_index_and_field() {
        let bad = r#"{"specversion":"0.3","id":"","source":5,"type":"t","time":"2026-01-02T03:04:05","data":[1]}"#;
        let body = format!("[{},{bad}]", ev("ok"));
        let Err(BodyError::Invalid(p)) = decode(body.as_bytes(), BodyFormat::Batch, LIMITS) else {
            panic!("expected problems")
        };
        let fields: Vec<_> = p.iter().map(|p| (p.index, p.field)).collect();
        assert_eq!(
            fields,
            vec![
                (1, "specversion"),
                (1, "id"),
                (1, "source"),
                (1, "subject"),
                (1, "time"),
                (1, "data")
            ]
        );
        assert!(p[4].reason.contains("no UTC offset"), "{}", p[4].reason);
        assert!(p[2].reason.contains("must be a string"));
    }

    #[test]
    fn whole_body_errors() {
        assert!(matches!(
            decode(b"\xff\xfe", BodyFormat::Single, LIMITS),
            Err(BodyError::Malformed(m)) if m.contains("UTF-8")
        ));
        assert!(matches!(
            decode(b"{", BodyFormat::Single, LIMITS),
            Err(BodyError::Malformed(m)) if m.contains("malformed JSON")
        ));
        assert!(matches!(
            decode(b"[]", BodyFormat::Batch, LIMITS),
            Err(BodyError::Empty)
        ));
        let four = format!("[{},{},{},{}]", ev("1"), ev("2"), ev("3"), ev("4"));
        assert_eq!(
            decode(four.as_bytes(), BodyFormat::Batch, LIMITS),
            Err(BodyError::TooManyEvents { count: 4, max: 3 })
        );
        assert!(matches!(
            decode(b"[1]", BodyFormat::Single, LIMITS),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn ndjson_bad_line_keeps_indexes() {
        let nd = format!("{}\nnot json\n{}", ev("a"), r#"{"specversion":"1.0"}"#);
        let Err(BodyError::Invalid(p)) = decode(nd.as_bytes(), BodyFormat::Ndjson, LIMITS) else {
            panic!("expected problems")
        };
        assert_eq!(p[0].index, 1);
        assert!(p[0].reason.contains("malformed JSON"));
        assert!(p[1..].iter().all(|p| p.index == 2));
    }

    #[test]
    fn oversized_event() {
        let big = format!(
            r#"{{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","time":"2026-01-02T03:04:05Z","data":{{"x":"{}"}}}}"#,
            "y".repeat(500)
        );
        let Err(BodyError::Invalid(p)) = decode(big.as_bytes(), BodyFormat::Single, LIMITS) else {
            panic!("expected problems")
        };
        assert!(p[0].reason.contains("over the limit"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The decoder of outside input never panics, whatever the bytes, and an accepted body
        /// always yields at least one event and at most the limit.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            for f in [BodyFormat::Single, BodyFormat::Batch, BodyFormat::Ndjson, BodyFormat::Json] {
                if let Ok(events) = decode(&body, f, LIMITS) {
                    proptest::prop_assert!(!events.is_empty() && events.len() <= LIMITS.max_events);
                }
            }
        }

        /// Near-valid events (fields dropped, retyped or garbled) are either accepted whole or
        /// refused with problems that name a field and an index inside the body.
        #[test]
        fn mutated_events_get_located_problems(
            drop_field in 0usize..8,
            retype in 0usize..8,
            garble in proptest::option::of("[\\x00-\\x7f]{0,12}"),
            count in 1usize..4,
        ) {
            let fields = ["specversion", "id", "source", "type", "subject", "time", "data", "extra"];
            let mut evs = Vec::new();
            for i in 0..count {
                let mut e: serde_json::Value = serde_json::from_str(&ev(&i.to_string())).expect("json");
                let obj = e.as_object_mut().expect("object");
                if i == 0 {
                    obj.remove(fields[drop_field]);
                    obj.insert(fields[retype].to_string(), serde_json::json!(42));
                    if let Some(g) = &garble {
                        obj.insert("time".into(), serde_json::Value::String(g.clone()));
                    }
                }
                evs.push(e);
            }
            let body = serde_json::to_vec(&evs).expect("json");
            match decode(&body, BodyFormat::Batch, LIMITS) {
                Ok(events) => proptest::prop_assert_eq!(events.len(), count),
                Err(BodyError::Invalid(problems)) => {
                    proptest::prop_assert!(!problems.is_empty());
                    proptest::prop_assert!(problems.iter().all(|p| p.index < count && !p.reason.is_empty()));
                }
                Err(other) => proptest::prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
