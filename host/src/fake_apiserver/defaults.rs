//! What the real API server does to a ResourceSlice before it stores it
//! (`docs/dra-api.md` §4.1), so that the fake hands back what the real one
//! would:
//!
//! * a taint without `timeAdded` gets the server's clock, in whole seconds
//!   (the API reference: "Added automatically during create or update if
//!   not set"); one that has it keeps it;
//! * a quantity is written in canonical form (the `Quantity` type's
//!   documented rules: no fractional digits, the largest suffix that keeps
//!   the value exact, a binary suffix only for whole numbers of at least
//!   1024, values finer than a billionth rounded up);
//! * empty lists and maps, nulls and an empty taint value are left out
//!   (`omitempty`, and the protobuf round trip through storage).
//!
//! Written from those rules, not from devhost's comparison of them.

use serde_json::{Map, Value, json};

/// Applies the server's defaulting and canonical forms to `slice`, with
/// `now` as the server's clock.
pub(super) fn default_slice(slice: &mut Value, now: &str) {
    let spec = &mut slice["spec"];
    if !spec.is_object() {
        return;
    }
    prune(spec);
    for device in spec.get_mut("devices").and_then(Value::as_array_mut).into_iter().flatten() {
        for taint in device.get_mut("taints").and_then(Value::as_array_mut).into_iter().flatten() {
            let Some(taint) = taint.as_object_mut() else { continue };
            if taint.get("value").and_then(Value::as_str) == Some("") {
                taint.remove("value");
            }
            taint.entry("timeAdded").or_insert_with(|| json!(now));
        }
        for capacity in device.get_mut("capacity").and_then(Value::as_object_mut).into_iter().flat_map(Map::values_mut)
        {
            if let Some(canonical) = capacity["value"].as_str().and_then(canonical_quantity) {
                capacity["value"] = json!(canonical);
            }
        }
    }
}

/// Removes nulls and empty lists and maps, innermost first.
fn prune(value: &mut Value) {
    match value {
        Value::Object(members) => {
            for member in members.values_mut() {
                prune(member);
            }
            members.retain(|_, member| !is_empty(member));
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(members) => members.is_empty(),
        _ => false,
    }
}

/// How a quantity was written, which decides how it is written back.
#[derive(PartialEq, Eq)]
enum Format {
    BinarySi,
    DecimalSi,
    DecimalExponent,
}

/// `text` in canonical form; `None` when it does not parse or does not fit
/// (the fake then keeps it as it came).
pub(super) fn canonical_quantity(text: &str) -> Option<String> {
    const BILLION: u128 = 1_000_000_000;
    let (sign, unsigned) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text.strip_prefix('+').unwrap_or(text)),
    };
    let split = unsigned.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    let binary = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let decimal =
        [("n", -9), ("u", -6), ("m", -3), ("", 0), ("k", 3), ("M", 6), ("G", 9), ("T", 12), ("P", 15), ("E", 18)];
    let (format, ten, two) = if let Some(index) = binary.iter().position(|s| *s == suffix) {
        (Format::BinarySi, 0_i32, 10 * (u32::try_from(index).ok()? + 1))
    } else if let Some((_, power)) = decimal.iter().find(|(s, _)| *s == suffix) {
        (Format::DecimalSi, *power, 0)
    } else {
        let exponent: i32 = suffix.strip_prefix(['e', 'E'])?.parse().ok()?;
        (Format::DecimalExponent, exponent, 0)
    };
    // The value in billionths, rounded up.
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    let mantissa: u128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    let mantissa = mantissa.checked_mul(1_u128.checked_shl(two)?)?;
    let scale = ten + 9 - i32::try_from(fraction.len()).ok()?;
    let nanos = if scale >= 0 {
        mantissa.checked_mul(10_u128.checked_pow(scale.unsigned_abs())?)?
    } else {
        match 10_u128.checked_pow(scale.unsigned_abs()) {
            Some(divisor) => mantissa.div_ceil(divisor),
            None => u128::from(mantissa != 0),
        }
    };
    if nanos == 0 {
        return Some("0".to_owned());
    }
    if format == Format::BinarySi && nanos % BILLION == 0 && nanos / BILLION >= 1024 {
        let (mut units, mut power) = (nanos / BILLION, 0);
        while power < binary.len() && units % 1024 == 0 {
            units /= 1024;
            power += 1;
        }
        let suffix = if power == 0 { "" } else { binary[power - 1] };
        return Some(format!("{sign}{units}{suffix}"));
    }
    // Decimal: the largest power of a thousand that keeps the number whole.
    let (mut number, mut exponent) = (nanos, -9_i32);
    while exponent < 18 && number % 1000 == 0 {
        number /= 1000;
        exponent += 3;
    }
    let suffix = match format {
        Format::DecimalExponent if exponent == 0 => String::new(),
        Format::DecimalExponent => format!("e{exponent}"),
        _ => decimal.iter().find(|(_, power)| *power == exponent).map(|(s, _)| (*s).to_owned())?,
    };
    Some(format!("{sign}{number}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_written_back_canonically() {
        for (given, stored) in [
            ("80Gi", "80Gi"),
            ("1024Mi", "1Gi"),
            ("1.5Gi", "1536Mi"),
            ("0.5Ki", "512"),
            ("1024", "1024"),
            ("1000", "1k"),
            ("1.5", "1500m"),
            ("0.5", "500m"),
            ("100m", "100m"),
            ("1e3", "1e3"),
            ("1000e0", "1e3"),
            ("+2", "2"),
            ("-1.5", "-1500m"),
            ("0", "0"),
            ("0Gi", "0"),
            ("0.0000000001", "1n"),
        ] {
            assert_eq!(canonical_quantity(given).as_deref(), Some(stored), "{given}");
        }
        for bad in ["", "Gi", "1.2.3", "1x", "e3"] {
            assert_eq!(canonical_quantity(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn taints_get_the_time_and_empties_go() {
        let mut slice = json!({"metadata": {"name": "s"}, "spec": {
            "driver": "d", "nodeName": "n", "pool": {"name": "n", "generation": 0, "resourceSliceCount": 1},
            "devices": [
                {"name": "a", "attributes": {}, "capacity": {"m": {"value": "1024Mi"}},
                 "taints": [{"key": "k", "effect": "NoSchedule", "value": ""},
                            {"key": "l", "effect": "NoExecute", "timeAdded": "2020-01-01T00:00:00Z"}]},
                {"name": "b", "taints": [], "bindsToNode": null},
            ],
            "sharedCounters": [],
        }});
        default_slice(&mut slice, "2026-05-01T12:00:00Z");
        assert_eq!(
            slice["spec"]["devices"],
            json!([
                {"name": "a", "capacity": {"m": {"value": "1Gi"}},
                 "taints": [{"key": "k", "effect": "NoSchedule", "timeAdded": "2026-05-01T12:00:00Z"},
                            {"key": "l", "effect": "NoExecute", "timeAdded": "2020-01-01T00:00:00Z"}]},
                {"name": "b"},
            ])
        );
        assert!(slice["spec"].get("sharedCounters").is_none());
        assert_eq!(slice["spec"]["pool"]["generation"], 0, "a zero that is not empty stays");
        let mut empty = json!({"spec": {"driver": "d", "devices": []}});
        default_slice(&mut empty, "2026-05-01T12:00:00Z");
        assert!(empty["spec"].get("devices").is_none(), "an empty pool's list is left out");
    }
}
