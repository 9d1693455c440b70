//! Byte sizes as people type them on a command line: `4096`, `64K`, `1M`, `10G`, `1T`.
//!
//! Shared by the corodev daemon's and corodev-bench's command lines so that both accept
//! the same spellings and say the same thing about a bad one. Boundary: parsing only, no
//! formatting and no policy (minimums, alignment) — each caller checks its own limits.
//! The error is a `String` so the function plugs straight into clap's `value_parser`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Parses `4096`, `64K`, `1M`, `10G`, `1T` (binary units).
///
/// Suffixes are case-insensitive; surrounding whitespace is ignored. Errors name the
/// input: a non-number is "not a size", an unknown suffix is an "unknown size suffix", and
/// a value past `u64::MAX` bytes is "too large" (checked, never wrapped).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use a number of bytes, e.g. 4096 or 1G"))?;
    let mult: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown size suffix '{suffix}' in '{s}': use K, M, G or T"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // From the daemon's command-line tests (daemon/src/cli.rs), unchanged.
    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1X").unwrap_err().contains("suffix"));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    // From corodev-bench's tests (integration/bench/src/main.rs), unchanged.
    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("128k"), Ok(128 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-4K").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
