//! Parsing of durations (`300ms`, `2s`, `1.5m`) and rates (`100mbit`, `1gbit`, `50MiB/s`).

/// Parses a duration into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (try 300ms, 2s, 1m)"))?;
    let mult = match unit.trim() {
        "ms" => 1.0,
        "s" | "" => 1000.0,
        "m" | "min" => 60_000.0,
        other => return Err(format!("unknown duration unit `{other}` in `{s}` (ms, s, m)")),
    };
    let ms = v * mult;
    if !ms.is_finite() || ms <= 0.0 {
        return Err(format!("`{s}` must be a positive duration"));
    }
    Ok(ms)
}

/// Parses a rate into bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a rate (try 100mbit, 1gbit, 50MiB/s)"))?;
    let unit = unit.trim().trim_end_matches("/s").trim_end_matches("ps");
    let bytes_per_s = match unit {
        "kbit" | "Kbit" | "kb" | "Kb" => v * 1e3 / 8.0,
        "mbit" | "Mbit" | "mb" | "Mb" => v * 1e6 / 8.0,
        "gbit" | "Gbit" | "gb" | "Gb" => v * 1e9 / 8.0,
        "B" | "" => v,
        "KB" | "kB" => v * 1e3,
        "MB" => v * 1e6,
        "GB" => v * 1e9,
        "KiB" => v * 1024.0,
        "MiB" => v * 1024.0 * 1024.0,
        "GiB" => v * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown rate unit `{other}` in `{s}` (kbit, mbit, gbit for bits per second; B, KB, MB, GB, KiB, MiB, GiB per second)"
            ))
        }
    };
    if !bytes_per_s.is_finite() || bytes_per_s < 1.0 {
        return Err(format!("`{s}` must be a positive rate"));
    }
    // Saturating float-to-int conversion; rates are far below u64::MAX.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes_per_s.round() as u64)
}

/// Parses a size in bytes (`512MiB`, `16GiB`, `1G`, `4096`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (try 512MiB, 16GiB)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KiB" | "k" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => return Err(format!("unknown size unit `{other}` in `{s}` (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    let b = v * mult;
    if !b.is_finite() || !(1.0..=1e18).contains(&b) {
        return Err(format!("`{s}` must be a positive size"));
    }
    // In range after the check above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(b.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("300ms").unwrap(), 300.0);
        assert_eq!(parse_duration_ms("2s").unwrap(), 2000.0);
        assert_eq!(parse_duration_ms("1.5s").unwrap(), 1500.0);
        assert_eq!(parse_duration_ms("1m").unwrap(), 60_000.0);
        assert_eq!(parse_duration_ms("3").unwrap(), 3000.0);
        assert!(parse_duration_ms("0s").is_err());
        assert!(parse_duration_ms("fast").is_err());
        assert!(parse_duration_ms("3h").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("big").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("50MiB/s").unwrap(), 50 * 1024 * 1024);
        assert_eq!(parse_rate("10MB/s").unwrap(), 10_000_000);
        assert_eq!(parse_rate("100Mbps").unwrap(), 12_500_000);
        assert!(parse_rate("0mbit").is_err());
        assert!(parse_rate("lots").is_err());
        assert!(parse_rate("5furlongs").is_err());
    }
}
