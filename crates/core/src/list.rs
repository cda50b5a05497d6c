//! Comma-separated lists, as flags and environment variables carry them.

use std::fmt;
use std::str::FromStr;

/// Parses `a, b,c` into its items; blank entries are ignored (so `""` is an empty list).
pub fn parse_comma_list<T: FromStr>(text: &str) -> Result<Vec<T>, T::Err> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(str::parse)
        .collect()
}

/// Writes `items` separated by commas, as [`parse_comma_list`] reads them.
pub fn write_comma_list<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    items: impl IntoIterator<Item = T>,
) -> fmt::Result {
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_entries_are_ignored_and_bad_ones_refused() {
        assert_eq!(parse_comma_list::<u8>(" 1, ,2,"), Ok(vec![1, 2]));
        assert_eq!(parse_comma_list::<u8>(""), Ok(vec![]));
        assert!(parse_comma_list::<u8>("1,x").is_err());
    }
}
