//! Worked examples from the public documentation of billing systems (source named in each test),
//! and property tests of the pricing invariants.

use billing_core::{money::round_line, Currency, Money, Price};
use proptest::prelude::*;
use rust_decimal::Decimal;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

fn price(json: &str) -> Price {
    Price::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

const ZUPLO_TIERS: &str = r#"[
    {"upToAmount":"1000","unitPrice":{"type":"unit","amount":"0.10"}},
    {"upToAmount":"10000","unitPrice":{"type":"unit","amount":"0.05"}},
    {"unitPrice":{"type":"unit","amount":"0.01"}}]"#;

#[test]
fn zuplo_graduated_and_volume_example() {
    // Zuplo docs, "Pricing models", tiered pricing: 0–1,000 at $0.10, 1,001–10,000 at $0.05,
    // 10,001+ at $0.01; 15,000 units cost $600 graduated and $150 volume.
    let g = price(&format!(
        r#"{{"type":"tiered","mode":"graduated","tiers":{ZUPLO_TIERS}}}"#
    ));
    assert_eq!(g.total(d("15000")).expect("total"), d("600"));
    let v = price(&format!(
        r#"{{"type":"tiered","mode":"volume","tiers":{ZUPLO_TIERS}}}"#
    ));
    assert_eq!(v.total(d("15000")).expect("total"), d("150"));
    let b = g.breakdown(d("15000")).expect("breakdown");
    let parts: Vec<_> = b.tiers.iter().map(|t| (t.quantity, t.total)).collect();
    assert_eq!(
        parts,
        vec![
            (d("1000"), d("100")),
            (d("9000"), d("450")),
            (d("5000"), d("50"))
        ]
    );
}

#[test]
fn lago_volume_example_with_flat_fees() {
    // Lago docs, charge models, "Volume": tiers 0–10,000 $0.0010, –50,000 $0.0008, –100,000
    // $0.0006, above $0.0004, each with a $10 fixed fee; 65,000 calls = 65,000 × 0.0006 + 10 = $49.
    let p = price(
        r#"{"type":"tiered","mode":"volume","tiers":[
        {"upToAmount":"10000","unitPrice":{"type":"unit","amount":"0.0010"},"flatPrice":{"type":"flat","amount":"10"}},
        {"upToAmount":"50000","unitPrice":{"type":"unit","amount":"0.0008"},"flatPrice":{"type":"flat","amount":"10"}},
        {"upToAmount":"100000","unitPrice":{"type":"unit","amount":"0.0006"},"flatPrice":{"type":"flat","amount":"10"}},
        {"unitPrice":{"type":"unit","amount":"0.0004"},"flatPrice":{"type":"flat","amount":"10"}}]}"#,
    );
    assert_eq!(p.total(d("65000")).expect("total"), d("49"));
}

#[test]
fn autumn_graduated_example() {
    // Autumn docs, "Graduated pricing": first 1,000 requests $0.01, next 9,000 $0.008, above
    // 10,000 $0.005; 15,000 requests = $107.
    let p = price(
        r#"{"type":"tiered","mode":"graduated","tiers":[
        {"upToAmount":"1000","unitPrice":{"type":"unit","amount":"0.01"}},
        {"upToAmount":"10000","unitPrice":{"type":"unit","amount":"0.008"}},
        {"unitPrice":{"type":"unit","amount":"0.005"}}]}"#,
    );
    assert_eq!(p.total(d("15000")).expect("total"), d("107"));
}

#[test]
fn flexprice_package_example_rounds_packages_up() {
    // Flexprice docs, "Tiered" with a package size: 4,500 calls in packages of 1,000 at $1.00
    // make 4.5 packages, rounded up to 5: $5.
    let p = price(r#"{"type":"package","amount":"1.00","quantityPerPackage":"1000"}"#);
    assert_eq!(p.total(d("4500")).expect("total"), d("5.00"));
    assert_eq!(p.total(d("4000")).expect("total"), d("4.00"));
}

#[test]
fn design_md_formats_parse_and_price() {
    let flat = price(r#"{"type":"flat","amount":"10"}"#);
    assert_eq!(flat.total(d("0")).expect("t"), d("10"));
    let unit = price(r#"{"type":"unit","amount":"0.002"}"#);
    assert_eq!(unit.total(d("1234.5")).expect("t"), d("2.469"));
    let tiered = price(
        r#"{"type":"tiered","mode":"graduated","tiers":[{"upToAmount":"5","flatPrice":{"type":"flat","amount":"100"},"unitPrice":{"type":"unit","amount":"5"}},{"unitPrice":{"type":"unit","amount":"1"}}]}"#,
    );
    // 5 units in tier 0 (100 + 25), 2 in tier 1.
    assert_eq!(tiered.total(d("7")).expect("t"), d("127"));
    assert_eq!(tiered.total(d("0")).expect("t"), d("0"));
    let package = price(r#"{"type":"package","amount":"15","quantityPerPackage":"10"}"#);
    assert_eq!(package.total(d("11")).expect("t"), d("30"));
    let dynamic = price(r#"{"type":"dynamic","multiplier":"1.2"}"#);
    assert_eq!(dynamic.total(d("0.35")).expect("t"), d("0.42"));
    let capped = price(r#"{"type":"unit","amount":"1","minimumAmount":"10","maximumAmount":"50"}"#);
    assert_eq!(capped.total(d("3")).expect("t"), d("10"));
    assert_eq!(capped.breakdown(d("3")).expect("b").minimum_true_up, d("7"));
    assert_eq!(capped.total(d("80")).expect("t"), d("50"));
    assert_eq!(
        capped.breakdown(d("80")).expect("b").maximum_reduction,
        d("30")
    );
    let free = price(
        r#"{"type":"package","amount":"2","quantityPerPackage":"100","freeQuantity":"1000"}"#,
    );
    assert_eq!(free.total(d("1000")).expect("t"), d("0"));
    assert_eq!(free.total(d("1001")).expect("t"), d("2"));
    // Fractional quantities between tier bounds go to the first tier whose bound they do not pass.
    let v = price(
        r#"{"type":"tiered","mode":"volume","tiers":[{"upToAmount":"5","unitPrice":{"type":"unit","amount":"2"}},{"unitPrice":{"type":"unit","amount":"1"}}]}"#,
    );
    assert_eq!(v.total(d("5")).expect("t"), d("10"));
    assert_eq!(v.total(d("5.5")).expect("t"), d("5.5"));
}

#[test]
fn invalid_prices_say_what_is_wrong() {
    for (json, needle) in [
        (
            r#"{"type":"unit","amount":0.1}"#,
            "not a valid price object",
        ),
        (r#"{"type":"unit","amount":"-1"}"#, "must not be negative"),
        (
            r#"{"type":"package","amount":"1","quantityPerPackage":"0"}"#,
            "quantityPerPackage",
        ),
        (
            r#"{"type":"tiered","mode":"graduated","tiers":[]}"#,
            "must not be empty",
        ),
        (
            r#"{"type":"tiered","mode":"graduated","tiers":[{"upToAmount":"5","unitPrice":{"type":"unit","amount":"1"}}]}"#,
            "last tier",
        ),
        (
            r#"{"type":"tiered","mode":"graduated","tiers":[{"upToAmount":"5","unitPrice":{"type":"unit","amount":"1"}},{"upToAmount":"3","unitPrice":{"type":"unit","amount":"1"}},{"unitPrice":{"type":"unit","amount":"1"}}]}"#,
            "above the previous",
        ),
        (
            r#"{"type":"unit","amount":"1","minimumAmount":"5","maximumAmount":"2"}"#,
            "must not exceed",
        ),
        (
            r#"{"type":"percent","amount":"1"}"#,
            "not a valid price object",
        ),
    ] {
        let e = Price::from_json(json).expect_err(json).to_string();
        assert!(e.contains(needle), "{json}: {e}");
    }
    let unit = price(r#"{"type":"unit","amount":"1"}"#);
    assert!(unit.total(d("-1")).is_err());
}

fn arb_decimal(max_units: i64, scale: u32) -> impl Strategy<Value = Decimal> {
    (0..=max_units).prop_map(move |n| Decimal::new(n, scale))
}

fn arb_price() -> impl Strategy<Value = Price> {
    let tiers = prop::collection::vec(
        (
            arb_decimal(100_000, 2),
            arb_decimal(5_000, 4),
            arb_decimal(2_000, 2),
        ),
        1..5,
    );
    let model = prop_oneof![
        arb_decimal(100_000, 2).prop_map(|a| format!(r#"{{"type":"unit","amount":"{a}"}}"#)),
        arb_decimal(100_000, 2).prop_map(|a| format!(r#"{{"type":"flat","amount":"{a}"}}"#)),
        (arb_decimal(10_000, 2), 1i64..1000).prop_map(|(a, n)| format!(r#"{{"type":"package","amount":"{a}","quantityPerPackage":"{n}"}}"#)),
        arb_decimal(50_000, 3).prop_map(|m| format!(r#"{{"type":"dynamic","multiplier":"{m}"}}"#)),
        (tiers, prop::bool::ANY).prop_map(|(ts, graduated)| {
            let mut bound = Decimal::ZERO;
            let n = ts.len();
            let tiers: Vec<String> = ts
                .into_iter()
                .enumerate()
                .map(|(i, (width, unit, flat))| {
                    bound += width + Decimal::ONE;
                    let up = if i + 1 == n { String::new() } else { format!(r#""upToAmount":"{bound}","#) };
                    format!(r#"{{{up}"unitPrice":{{"type":"unit","amount":"{unit}"}},"flatPrice":{{"type":"flat","amount":"{flat}"}}}}"#)
                })
                .collect();
            let mode = if graduated { "graduated" } else { "volume" };
            format!(r#"{{"type":"tiered","mode":"{mode}","tiers":[{}]}}"#, tiers.join(","))
        }),
    ];
    (
        model,
        prop::option::of(arb_decimal(100_000, 2)),
        prop::option::of(arb_decimal(1_000_000, 2)),
        prop::option::of(arb_decimal(10_000, 1)),
    )
        .prop_map(|(m, min, max, free)| {
            let mut v: serde_json::Value = serde_json::from_str(&m).expect("model json");
            let (min, max) = match (min, max) {
                (Some(a), Some(b)) if a > b => (Some(b), Some(a)),
                x => x,
            };
            if let Some(x) = min {
                v["minimumAmount"] = x.to_string().into();
            }
            if let Some(x) = max {
                v["maximumAmount"] = x.to_string().into();
            }
            if let Some(x) = free {
                v["freeQuantity"] = x.to_string().into();
            }
            Price::from_json(&v.to_string()).expect("generated prices are valid")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Incremental pricing of any split of a period's usage adds up to the one-shot total.
    #[test]
    fn incremental_equals_one_shot(p in arb_price(), parts in prop::collection::vec(arb_decimal(1_000_000, 3), 1..8)) {
        let mut already: Option<Decimal> = None;
        let mut sum = Decimal::ZERO;
        for q in &parts {
            sum += p.incremental(already, *q).expect("incremental");
            already = Some(already.unwrap_or(Decimal::ZERO) + q);
        }
        let all: Decimal = parts.iter().sum();
        prop_assert_eq!(sum, p.total(all).expect("total"));
    }

    /// Graduated tiers (and unit, package, dynamic prices) never cost less for more usage, and
    /// nothing is ever negative.
    #[test]
    fn totals_are_monotonic_except_volume_and_never_negative(p in arb_price(), a in arb_decimal(10_000_000, 3), b in arb_decimal(10_000_000, 3)) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let (tlo, thi) = (p.total(lo).expect("lo"), p.total(hi).expect("hi"));
        prop_assert!(tlo >= Decimal::ZERO && thi >= Decimal::ZERO);
        let volume = matches!(p.model, billing_core::price::Model::Tiered { mode: billing_core::TierMode::Volume, .. });
        if !volume {
            prop_assert!(tlo <= thi, "total({}) = {} > total({}) = {}", lo, tlo, hi, thi);
        }
    }

    /// A breakdown's parts add up to its total.
    #[test]
    fn breakdown_parts_add_up(p in arb_price(), q in arb_decimal(10_000_000, 3)) {
        let b = p.breakdown(q).expect("breakdown");
        if !b.tiers.is_empty() {
            prop_assert_eq!(b.tiers.iter().map(|t| t.total).sum::<Decimal>(), b.usage_amount);
        }
        prop_assert_eq!(b.usage_amount + b.minimum_true_up - b.maximum_reduction, b.total);
    }

    /// Lines rounded once each sum to the invoice total, to the cent, in any currency.
    #[test]
    fn rounded_lines_reconcile_with_the_invoice_total(amounts in prop::collection::vec(arb_decimal(1_000_000_000, 6), 1..20), code in prop::sample::select(vec!["USD", "JPY", "KWD", "EUR"])) {
        let c = Currency::from_code(code).expect("currency");
        let lines: Vec<Money> = amounts.iter().map(|a| Money::new(*a, c).rounded()).collect();
        let total = Money::sum(c, &lines).expect("sum");
        prop_assert_eq!(round_line(total.amount, c), total.amount);
        prop_assert_eq!(total.amount, lines.iter().map(|l| l.amount).sum::<Decimal>());
    }
}
