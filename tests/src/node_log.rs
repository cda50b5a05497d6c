//! Reading what a node process logged, and whether it still runs.

use drover_core::NodeId;

use crate::NodeProcess;

impl NodeProcess {
    /// Its log so far, without terminal colours.
    pub fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The log lines that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Every id the node registered under, in order: its first, then one per re-registration
    /// (after it was declared dead).
    pub fn registrations(&self) -> Vec<NodeId> {
        self.log_lines("node started")
            .iter()
            .filter_map(|line| {
                let (_, rest) = line.split_once("node.id=")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .collect()
    }

    /// Is the process still running (it has not exited)?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// `text` without ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[3mnode.id\u{1b}[0m\u{1b}[2m=\u{1b}[0mabc x"),
            "node.id=abc x"
        );
    }
}
