//! `rater quote` from the outside, as billing ops run it.

use std::process::Command;

fn quote(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rater"))
        .arg("quote")
        .args(args)
        .output()
        .expect("run rater");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GRADUATED: &str = r#"{"type":"tiered","mode":"graduated","tiers":[{"upToAmount":"1000","unitPrice":{"type":"unit","amount":"0.10"}},{"upToAmount":"10000","unitPrice":{"type":"unit","amount":"0.05"}},{"unitPrice":{"type":"unit","amount":"0.01"}}]}"#;

#[test]
fn quotes_a_quantity_and_an_increment() {
    assert_eq!(
        quote(&["--price", GRADUATED, "--quantity", "15000"]),
        (true, r#"{"amount":"600"}"#.to_string(), String::new())
    );
    // The next 5,000 after 10,000 already billed: all in the last tier.
    assert_eq!(
        quote(&[
            "--price",
            GRADUATED,
            "--quantity",
            "5000",
            "--already-billed",
            "10000"
        ])
        .1,
        r#"{"amount":"50"}"#
    );
    assert_eq!(
        quote(&[
            "--price",
            r#"{"type":"unit","amount":"0.000001"}"#,
            "--quantity",
            "3"
        ])
        .1,
        r#"{"amount":"0.000003"}"#
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let (ok, _, err) = quote(&[
        "--price",
        r#"{"type":"unit","amount":"-2"}"#,
        "--quantity",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("amount must not be negative"), "{err}");
    let (ok, _, err) = quote(&["--price", GRADUATED, "--quantity", "ten"]);
    assert!(!ok);
    assert!(
        err.contains("--quantity \"ten\" is not a decimal number"),
        "{err}"
    );
}
