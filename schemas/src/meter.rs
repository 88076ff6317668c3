//! Meter definitions as the aggregator applies them and control-api validates them: the
//! aggregation, the JSONPath subset of `meter.schema.json`, and how a value is read from an
//! event's `data` (exactly, as a decimal, never through a float).

use rust_decimal::Decimal;
use serde_json::Value;
use std::fmt;
use std::str::FromStr;

/// How a meter folds the values of its events into one number per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregation {
    Sum,
    Count,
    Avg,
    Min,
    Max,
    UniqueCount,
    Latest,
}

impl Aggregation {
    pub const ALL: [Aggregation; 7] = [
        Aggregation::Sum,
        Aggregation::Count,
        Aggregation::Avg,
        Aggregation::Min,
        Aggregation::Max,
        Aggregation::UniqueCount,
        Aggregation::Latest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "SUM",
            Aggregation::Count => "COUNT",
            Aggregation::Avg => "AVG",
            Aggregation::Min => "MIN",
            Aggregation::Max => "MAX",
            Aggregation::UniqueCount => "UNIQUE_COUNT",
            Aggregation::Latest => "LATEST",
        }
    }

    /// Whether the meter reads a value (all but COUNT).
    pub fn needs_value(self) -> bool {
        !matches!(self, Aggregation::Count)
    }

    /// Whether the value must be a number (UNIQUE_COUNT counts any scalar).
    pub fn numeric(self) -> bool {
        !matches!(self, Aggregation::Count | Aggregation::UniqueCount)
    }
}

impl FromStr for Aggregation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Aggregation::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                "must be one of SUM, COUNT, AVG, MIN, MAX, UNIQUE_COUNT, LATEST".to_string()
            })
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSONPath subset meters use: `$` followed by `.name`, `['any key']` or `[index]` steps
/// (as in `meter.schema.json`). Enough for every property path; no filters or wildcards, so a
/// path names at most one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix('$')
            .ok_or_else(|| "must start with `$`".to_string())?;
        let mut steps = Vec::new();
        let b = rest.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'.' => {
                    let start = i + 1;
                    let mut j = start;
                    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                        j += 1;
                    }
                    if j == start || b[start].is_ascii_digit() {
                        return Err(format!("expected a property name after `.` at {}", i + 1));
                    }
                    steps.push(Step::Key(rest[start..j].to_string()));
                    i = j;
                }
                b'[' if b.get(i + 1) == Some(&b'\'') => {
                    let start = i + 2;
                    let end = rest[start..]
                        .find("']")
                        .ok_or_else(|| "unterminated `['...']`".to_string())?;
                    if end == 0 {
                        return Err("empty property name in `['']`".into());
                    }
                    steps.push(Step::Key(rest[start..start + end].to_string()));
                    i = start + end + 2;
                }
                b'[' => {
                    let start = i + 1;
                    let end = rest[start..]
                        .find(']')
                        .ok_or_else(|| "unterminated `[`".to_string())?;
                    let idx: usize = rest[start..start + end]
                        .parse()
                        .map_err(|_| "expected an array index inside `[]`".to_string())?;
                    steps.push(Step::Index(idx));
                    i = start + end + 1;
                }
                _ => return Err(format!("unexpected `{}` at {}", b[i] as char, i + 1)),
            }
        }
        if steps.is_empty() {
            return Err("must name a property, e.g. `$.tokens`".into());
        }
        Ok(JsonPath {
            text: text.to_string(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value the path names in `data`, if any.
    pub fn get<'a>(&self, data: &'a Value) -> Option<&'a Value> {
        let mut v = data;
        for s in &self.steps {
            v = match (s, v) {
                (Step::Key(k), Value::Object(m)) => m.get(k)?,
                (Step::Index(i), Value::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        Some(v)
    }
}

/// Why a value cannot be metered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueError {
    /// The path names nothing in `data` (or `data` is absent).
    Missing,
    /// Present but not a number or numeric string (for SUM, AVG, MIN, MAX, LATEST).
    NotANumber,
    /// A number beyond the exact decimal range (28 significant digits, |x| < 7.9e28).
    OutOfRange,
    /// UNIQUE_COUNT value that is an object, an array or null.
    NotAScalar,
}

impl ValueError {
    /// The reason label used in dead letters, outcomes and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            ValueError::Missing => "value_missing",
            ValueError::NotANumber => "value_not_a_number",
            ValueError::OutOfRange => "value_out_of_range",
            ValueError::NotAScalar => "value_not_a_scalar",
        }
    }
}

/// Reads a decimal exactly from a JSON number or a numeric string (`"12.5"`, `"1e3"`).
pub fn decimal(v: &Value) -> Result<Decimal, ValueError> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return Err(ValueError::NotANumber),
    };
    parse_decimal(&text)
}

/// Parses the text of a JSON number (plain or with an exponent) into an exact decimal.
pub fn parse_decimal(text: &str) -> Result<Decimal, ValueError> {
    let t = text;
    let valid = !t.is_empty()
        && t.bytes()
            .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E'))
        && t.bytes().any(|c| c.is_ascii_digit());
    if !valid {
        return Err(ValueError::NotANumber);
    }
    let r = if t.contains(['e', 'E']) {
        Decimal::from_scientific(t)
    } else {
        Decimal::from_str_exact(t)
    };
    match r {
        Ok(d) => Ok(d.normalize()),
        Err(rust_decimal::Error::ErrorString(_)) if t.parse::<f64>().is_err() => {
            Err(ValueError::NotANumber)
        }
        Err(_) => Err(ValueError::OutOfRange),
    }
}

/// The text a scalar is counted under by UNIQUE_COUNT and grouped under by `groupBy`:
/// strings as they are, numbers as exact normalised decimals (so `1`, `1.0` and `"1"` are one
/// value), booleans as `true`/`false`.
pub fn scalar_text(v: &Value) -> Result<String, ValueError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => {
            let t = n.to_string();
            Ok(parse_decimal(&t).map(|d| d.to_string()).unwrap_or(t))
        }
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(ValueError::NotAScalar),
    }
}

/// Checks a meter slug: lower-case letters and digits, words joined by `_` or `-`, ≤ 63 chars.
pub fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.split(['_', '-']).all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        let d: Value =
            serde_json::from_str(r#"{"a":{"b":[10,{"c":"x"}]},"odd key":3,"tokens":12.50}"#)
                .expect("json");
        let p = |s: &str| JsonPath::parse(s).expect(s);
        assert_eq!(p("$.a.b[0]").get(&d), Some(&json!(10)));
        assert_eq!(p("$.a.b[1].c").get(&d), Some(&json!("x")));
        assert_eq!(p("$['odd key']").get(&d), Some(&json!(3)));
        assert_eq!(p("$.missing").get(&d), None);
        assert_eq!(p("$.a.b.c").get(&d), None);
        for bad in [
            "", "$", "a.b", "$.", "$.1a", "$[x]", "$['a'", "$..a", "$.a b",
        ] {
            assert!(JsonPath::parse(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(
            decimal(p("$.tokens").get(&d).expect("tokens")).map(|x| x.to_string()),
            Ok("12.5".to_string())
        );
    }

    #[test]
    fn decimals_are_exact() {
        let ok = |s: &str| parse_decimal(s).map(|d| d.to_string());
        assert_eq!(ok("0.1"), Ok("0.1".into()));
        assert_eq!(ok("1e3"), Ok("1000".into()));
        assert_eq!(ok("-2.50"), Ok("-2.5".into()));
        assert_eq!(
            ok("12345678901234567890.12345678"),
            Ok("12345678901234567890.12345678".into())
        );
        assert_eq!(ok("abc"), Err(ValueError::NotANumber));
        assert_eq!(ok(""), Err(ValueError::NotANumber));
        assert_eq!(ok("1e40"), Err(ValueError::OutOfRange));
        assert_eq!(decimal(&json!(true)), Err(ValueError::NotANumber));
        assert_eq!(decimal(&json!("7")).map(|d| d.to_string()), Ok("7".into()));
        assert_eq!(scalar_text(&json!(1.0)), Ok("1".into()));
        assert_eq!(scalar_text(&json!([1])), Err(ValueError::NotAScalar));
    }

    #[test]
    fn slugs() {
        assert!(valid_slug("tokens_total"));
        assert!(valid_slug("gpu-seconds2"));
        assert!(!valid_slug("Tokens"));
        assert!(!valid_slug("a__b"));
        assert!(!valid_slug("-a"));
    }
}
