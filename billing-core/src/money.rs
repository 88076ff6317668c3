//! Money: an exact decimal amount in one ISO 4217 currency.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An ISO 4217 currency, with the number of minor units it is billed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

impl Currency {
    /// The currency for an ISO 4217 alphabetic code (`USD`, `eur` is refused: codes are upper
    /// case).
    pub fn from_code(code: &str) -> Result<Self, MoneyError> {
        iso_currency::Currency::from_code(code)
            .map(Self)
            .ok_or_else(|| MoneyError::UnknownCurrency(code.to_string()))
    }

    pub fn code(&self) -> &'static str {
        self.0.code()
    }

    /// Digits after the decimal point of the currency's minor unit (USD 2, JPY 0, KWD 3).
    /// Currencies without a minor unit defined by ISO 4217 (precious metals and the like) are
    /// billed with 2.
    pub fn minor_units(&self) -> u32 {
        self.0.exponent().map_or(2, u32::from)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_code(s)
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_code(&s).map_err(serde::de::Error::custom)
    }
}

/// What went wrong with money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown ISO 4217 currency code {0:?}")]
    UnknownCurrency(String),
    #[error("cannot combine {0} and {1}: amounts in different currencies are never converted")]
    CurrencyMismatch(Currency, Currency),
    #[error("amount out of range")]
    Overflow,
}

/// An exact amount of one currency. Never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount: Decimal, currency: Currency) -> Self {
        Self { amount, currency }
    }

    pub fn zero(currency: Currency) -> Self {
        Self::new(Decimal::ZERO, currency)
    }

    fn same(&self, other: &Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch(self.currency, other.currency))
        }
    }

    pub fn checked_add(&self, other: &Money) -> Result<Money, MoneyError> {
        self.same(other)?;
        let amount = self
            .amount
            .checked_add(other.amount)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    pub fn checked_sub(&self, other: &Money) -> Result<Money, MoneyError> {
        self.same(other)?;
        let amount = self
            .amount
            .checked_sub(other.amount)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    /// Sum of `items`, all in `currency`.
    pub fn sum<'a>(
        currency: Currency,
        items: impl IntoIterator<Item = &'a Money>,
    ) -> Result<Money, MoneyError> {
        items
            .into_iter()
            .try_fold(Money::zero(currency), |acc, m| acc.checked_add(m))
    }

    /// This amount rounded by the project's one rule ([`round_line`]).
    pub fn rounded(&self) -> Money {
        Money::new(round_line(self.amount, self.currency), self.currency)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// The project's rounding rule, applied once per invoice line total: to the currency's minor
/// unit, half away from zero (commercial rounding: 0.125 USD → 0.13, -0.125 → -0.13). Applying it
/// twice changes nothing.
pub fn round_line(amount: Decimal, currency: Currency) -> Decimal {
    amount.round_dp_with_strategy(
        currency.minor_units(),
        RoundingStrategy::MidpointAwayFromZero,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("decimal")
    }

    #[test]
    fn currencies_carry_their_minor_units() {
        assert_eq!(Currency::from_code("USD").expect("usd").minor_units(), 2);
        assert_eq!(Currency::from_code("JPY").expect("jpy").minor_units(), 0);
        assert_eq!(Currency::from_code("KWD").expect("kwd").minor_units(), 3);
        assert!(Currency::from_code("XXY").is_err());
    }

    #[test]
    fn arithmetic_across_currencies_is_an_error() {
        let usd = Currency::from_code("USD").expect("usd");
        let eur = Currency::from_code("EUR").expect("eur");
        let a = Money::new(d("1.10"), usd);
        let b = Money::new(d("2"), eur);
        assert_eq!(
            a.checked_add(&b),
            Err(MoneyError::CurrencyMismatch(usd, eur))
        );
        assert_eq!(
            a.checked_add(&Money::new(d("0.2"), usd))
                .expect("same")
                .amount,
            d("1.30")
        );
    }

    #[test]
    fn rounding_is_half_away_from_zero_to_the_minor_unit() {
        let usd = Currency::from_code("USD").expect("usd");
        let jpy = Currency::from_code("JPY").expect("jpy");
        assert_eq!(round_line(d("0.125"), usd), d("0.13"));
        assert_eq!(round_line(d("-0.125"), usd), d("-0.13"));
        assert_eq!(round_line(d("0.1249999"), usd), d("0.12"));
        assert_eq!(round_line(d("10.5"), jpy), d("11"));
        assert_eq!(round_line(round_line(d("2.675"), usd), usd), d("2.68"));
    }

    #[test]
    fn money_json_keeps_amounts_as_strings() {
        let m: Money =
            serde_json::from_str(r#"{"amount":"0.000000000000000000001","currency":"EUR"}"#)
                .expect("json");
        assert_eq!(m.amount, d("0.000000000000000000001"));
        assert_eq!(
            serde_json::to_string(&m).expect("json"),
            r#"{"amount":"0.000000000000000000001","currency":"EUR"}"#
        );
    }
}
