//! Kubernetes quantities (`80Gi`, `1500m`, `2e3`), as the API server
//! reads them: whether a text is one, and its value, so that amounts
//! written differently (`1Gi`, `1024Mi`) compare equal. Device capacities,
//! counters and request policies are all quantities.

/// A Kubernetes quantity: a signed decimal number, optionally followed by
/// a binary suffix (`Ki` … `Ei`), a decimal suffix (`n u m k M G T P E`) or
/// a decimal exponent (`e3`, `E-2`).
pub fn check_quantity(quantity: &str) -> Result<(), String> {
    let bad =
        || format!("{quantity:?} is not a Kubernetes quantity (a number with an optional suffix: 80Gi, 1500m, 2e3)");
    let unsigned = quantity.strip_prefix(['+', '-']).unwrap_or(quantity);
    let number_end = unsigned.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let digits = number.replace('.', "");
    if digits.is_empty() || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let suffix_ok = match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        exponent => exponent
            .strip_prefix(['e', 'E'])
            .map(|rest| rest.strip_prefix(['+', '-']).unwrap_or(rest))
            .is_some_and(|digits| !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())),
    };
    if !suffix_ok {
        return Err(bad());
    }
    Ok(())
}

/// A quantity's value in billionths (the finest the API keeps: finer
/// values are rounded away from zero, as the server rounds them); `None`
/// when it does not parse or does not fit, and is then compared as text.
pub fn quantity_nanos(quantity: &str) -> Option<i128> {
    let (negative, unsigned) = match quantity.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, quantity.strip_prefix('+').unwrap_or(quantity)),
    };
    let end = unsigned.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let (power_of_ten, power_of_two): (i64, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        exponent => (exponent.strip_prefix(['e', 'E'])?.parse().ok()?, 0),
    };
    let digits = format!("{whole}{fraction}");
    let mantissa: i128 = digits.trim_start_matches('0').parse().or_else(|_| digits.parse()).ok()?;
    let mantissa = mantissa.checked_mul(1_i128.checked_shl(power_of_two)?)?;
    let fraction_digits = i64::try_from(fraction.len()).ok()?;
    let scale = power_of_ten.checked_add(9)?.checked_sub(fraction_digits)?;
    let magnitude = if scale >= 0 {
        mantissa.checked_mul(10_i128.checked_pow(u32::try_from(scale).ok()?)?)?
    } else {
        match 10_i128.checked_pow(u32::try_from(-scale).ok()?) {
            Some(divisor) => mantissa / divisor + i128::from(mantissa % divisor != 0),
            // Far below a billionth: one billionth, or zero.
            None => i128::from(mantissa != 0),
        }
    };
    Some(if negative { -magnitude } else { magnitude })
}
