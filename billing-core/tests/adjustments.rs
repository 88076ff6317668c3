//! Percentage models, proration, taxes, discounts and credit notes: worked examples (sources
//! named) and invariants.

use billing_core::invoice::{self, Discount, LineInput, TaxRate, TaxRounding};
use billing_core::percentage::{GraduatedPercentage, Percentage, Seen};
use billing_core::proration::{self, Span};
use billing_core::Currency;
use chrono::NaiveDate;
use proptest::prelude::*;
use rust_decimal::Decimal;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

fn usd() -> Currency {
    Currency::from_code("USD").expect("usd")
}

/// Lago docs, "Graduated percentage" charge model: tiers 0–1000 at 1 % + $200, 1001–10000 at
/// 2 % + $300, above at 3 % + $400; transactions of $500, $550 and $4000 cost $205, $306, $80.
#[test]
fn lago_graduated_percentage_example() {
    let p: GraduatedPercentage = serde_json::from_str(
        r#"{"tiers":[{"upToAmount":"1000","rate":"1","flatAmount":"200"},
                     {"upToAmount":"10000","rate":"2","flatAmount":"300"},
                     {"rate":"3","flatAmount":"400"}]}"#,
    )
    .expect("price");
    assert_eq!(p.incremental(d("0"), d("500")), Ok(d("205")));
    assert_eq!(p.incremental(d("500"), d("550")), Ok(d("306")));
    assert_eq!(p.incremental(d("1050"), d("4000")), Ok(d("80")));
    assert_eq!(p.total(d("5050")), Ok(d("591")));
}

/// Lago docs, "Clone Stripe pricing" template: online card payments cost 2.9 % + $0.30 per
/// transaction; a $100 payment costs $3.20.
#[test]
fn stripe_card_pricing_example() {
    let p: Percentage =
        serde_json::from_str(r#"{"rate":"2.9","fixedAmount":"0.30"}"#).expect("price");
    assert_eq!(
        p.charge(Seen::default(), &[d("100")]).map(|r| r.0),
        Ok(d("3.20"))
    );
}

/// Hand-computed: 1 % + $0.10, first 2 transactions without the fixed fee, first $500 free of the
/// rate, each fee between $0.50 and $5.
#[test]
fn percentage_with_free_units_and_per_transaction_bounds() {
    let p: Percentage = serde_json::from_str(
        r#"{"rate":"1","fixedAmount":"0.10","freeEvents":2,"freeAmount":"500",
            "perTransactionMinAmount":"0.50","perTransactionMaxAmount":"5"}"#,
    )
    .expect("price");
    // 300: free value, free event → 0. 300: 100 rated (1.00), free event → 1.00.
    // 50: 0.50 + 0.10 = 0.60. 10: 0.10 + 0.10 = 0.20 → minimum 0.50. 2000: 20.10 → maximum 5.
    let (total, seen) = p
        .charge(
            Seen::default(),
            &[d("300"), d("300"), d("50"), d("10"), d("2000")],
        )
        .expect("charge");
    assert_eq!(total, d("0") + d("1.00") + d("0.60") + d("0.50") + d("5"));
    assert_eq!(
        seen,
        Seen {
            transactions: 5,
            value: d("2660")
        }
    );
    assert!(serde_json::from_str::<Percentage>(r#"{"rate":"101"}"#)
        .expect("json")
        .validate()
        .is_err());
}

#[test]
fn proration_by_day_and_plan_change() {
    let day = |m, dd| NaiveDate::from_ymd_opt(2026, m, dd).expect("date");
    // March: 31 days; from the 11th: 21 days.
    let march = Span::Days(day(3, 1), day(4, 1));
    let rest = Span::Days(day(3, 11), day(4, 1));
    assert_eq!(proration::prorate(d("31"), march, rest), Ok(d("21")));
    // Upgrade from $31 to $62 on the 11th: credit 21, charge 42.
    assert_eq!(
        proration::change(d("31"), d("62"), march, rest),
        Ok((d("-21"), d("42")))
    );
    // By the second: a quarter of a 4-hour period.
    let t = |h: i64| chrono::DateTime::from_timestamp(h * 3600, 0).expect("time");
    assert_eq!(
        proration::prorate(
            d("10"),
            Span::Seconds(t(0), t(4)),
            Span::Seconds(t(3), t(5))
        ),
        Ok(d("2.5"))
    );
    assert!(proration::prorate(d("1"), march, Span::Seconds(t(0), t(1))).is_err());
}

fn vat(rate: &str, inclusive: bool) -> Option<TaxRate> {
    Some(TaxRate {
        region: "EU-DE".into(),
        rate: d(rate),
        inclusive,
    })
}

/// Hand-computed: three lines of $0.335 with 19 % VAT: rounding per line gives 3 × 0.06, rounding
/// once over the invoice gives 0.19 (3 × 0.34 × 19 % = 0.1938), allocated 0.07 + 0.06 + 0.06.
#[test]
fn tax_rounding_per_line_or_per_invoice() {
    let lines: Vec<LineInput> = (0..3)
        .map(|i| LineInput {
            description: format!("l{i}"),
            amount: d("0.335"),
            tax: vat("19", false),
        })
        .collect();
    let per_line = invoice::compute(usd(), &lines, None, TaxRounding::Line).expect("invoice");
    assert_eq!(per_line.subtotal, d("1.02"));
    assert_eq!(per_line.tax, d("0.18"));
    assert_eq!(per_line.total, d("1.20"));
    let per_invoice = invoice::compute(usd(), &lines, None, TaxRounding::Invoice).expect("invoice");
    assert_eq!(per_invoice.tax, d("0.19"));
    assert_eq!(
        per_invoice.lines.iter().map(|l| l.tax).collect::<Vec<_>>(),
        vec![d("0.07"), d("0.06"), d("0.06")]
    );
    assert_eq!(per_invoice.total, d("1.21"));
}

/// Hand-computed: a €119 price including 19 % VAT is €100 net + €19 tax; with a 10 % discount,
/// €107.10 gross = €90 net + €17.10 tax.
#[test]
fn inclusive_prices_and_discounts() {
    let eur = Currency::from_code("EUR").expect("eur");
    let lines = [LineInput {
        description: "plan".into(),
        amount: d("119"),
        tax: vat("19", true),
    }];
    let t = invoice::compute(eur, &lines, None, TaxRounding::Line).expect("invoice");
    assert_eq!((t.net, t.tax, t.total), (d("100"), d("19"), d("119")));
    let t = invoice::compute(
        eur,
        &lines,
        Some(Discount::Percentage { rate: d("10") }),
        TaxRounding::Line,
    )
    .expect("invoice");
    assert_eq!(
        (t.discount, t.net, t.tax, t.total),
        (d("11.90"), d("90.00"), d("17.10"), d("107.10"))
    );
    // An amount discount never exceeds what is owed.
    let t = invoice::compute(
        eur,
        &lines,
        Some(Discount::Amount { amount: d("500") }),
        TaxRounding::Line,
    )
    .expect("invoice");
    assert_eq!(t.total, d("0"));
}

#[test]
fn credit_notes_never_exceed_the_invoice() {
    let lines = [
        LineInput {
            description: "tokens".into(),
            amount: d("100"),
            tax: vat("20", false),
        },
        LineInput {
            description: "calls".into(),
            amount: d("10"),
            tax: None,
        },
    ];
    let inv = invoice::compute(usd(), &lines, None, TaxRounding::Line).expect("invoice");
    assert_eq!(inv.total, d("130"));
    let note = invoice::credit_note(&inv, &[], &[(0, d("60"))]).expect("credit");
    assert_eq!(
        (note.net, note.tax, note.total),
        (d("-50"), d("-10"), d("-60"))
    );
    assert!(
        invoice::credit_note(&inv, &[d("60")], &[(0, d("60.01"))]).is_err(),
        "only 60 left"
    );
    assert!(
        invoice::credit_note(&inv, &[], &[(2, d("1"))]).is_err(),
        "no such line"
    );
    let full = invoice::credit_note(&inv, &[], &[(0, d("120")), (1, d("10"))]).expect("credit");
    assert_eq!(full.total, -inv.total);
}

fn amount() -> impl Strategy<Value = Decimal> {
    (0i64..10_000_000, 0u32..5).prop_map(|(m, s)| Decimal::new(m, s))
}

proptest! {
    /// Pricing transactions in two pieces gives the one-shot total, for any split.
    #[test]
    fn percentage_increments_add_up(values in prop::collection::vec(amount(), 0..30), split in 0usize..30,
                                    free_events in 0u64..5, free in amount()) {
        let p = Percentage { rate: d("1.5"), fixed_amount: Some(d("0.25")), free_events,
                             free_amount: Some(free), per_transaction_min_amount: Some(d("0.3")),
                             per_transaction_max_amount: Some(d("40")) };
        let split = split.min(values.len());
        let (whole, _) = p.charge(Seen::default(), &values).expect("whole");
        let (a, seen) = p.charge(Seen::default(), &values[..split]).expect("a");
        let (b, _) = p.charge(seen, &values[split..]).expect("b");
        prop_assert_eq!(whole, a + b);
        prop_assert!(whole >= Decimal::ZERO);
    }

    #[test]
    fn graduated_percentage_is_monotonic_and_incremental(a in amount(), b in amount()) {
        let p: GraduatedPercentage = serde_json::from_str(
            r#"{"tiers":[{"upToAmount":"1000","rate":"1","flatAmount":"2"},{"upToAmount":"5000","rate":"0.5"},{"rate":"0.1","flatAmount":"1"}]}"#,
        ).expect("price");
        let (lo, hi) = (a.min(b), a.max(b));
        prop_assert!(p.total(lo).expect("lo") <= p.total(hi).expect("hi"));
        prop_assert_eq!(p.total(lo).expect("lo") + p.incremental(lo, hi - lo).expect("inc"), p.total(hi).expect("hi"));
    }

    /// Lines and totals reconcile to the cent under every rounding mode and discount.
    #[test]
    fn invoices_reconcile(amounts in prop::collection::vec(amount(), 1..12), taxed in prop::collection::vec(0u8..3, 12),
                          pct in 0u32..100, per_invoice in any::<bool>()) {
        let lines: Vec<LineInput> = amounts.iter().zip(&taxed).map(|(a, t)| LineInput {
            description: String::new(),
            amount: *a,
            tax: match t { 0 => None, 1 => vat("19", false), _ => vat("7", true) },
        }).collect();
        let mode = if per_invoice { TaxRounding::Invoice } else { TaxRounding::Line };
        let t = invoice::compute(usd(), &lines, Some(Discount::Percentage { rate: Decimal::from(pct) }), mode).expect("invoice");
        let cents = |x: Decimal| x == x.round_dp(2);
        prop_assert_eq!(t.total, t.lines.iter().map(|l| l.gross).sum::<Decimal>());
        prop_assert_eq!(t.total, t.net + t.tax);
        prop_assert_eq!(t.subtotal - t.discount, t.lines.iter().map(|l| l.base - l.discount).sum::<Decimal>());
        for l in &t.lines {
            prop_assert_eq!(l.net + l.tax, l.gross);
            prop_assert!(cents(l.net) && cents(l.tax) && cents(l.gross) && cents(l.discount));
            prop_assert!(l.gross >= Decimal::ZERO && l.discount <= l.base);
        }
    }
}
