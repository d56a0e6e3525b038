//! Progress on stderr for the long steps of commands that have no natural counter (a spinner with
//! the elapsed time and the current step). Hidden with `--quiet` and whenever stderr is not a
//! terminal (indicatif draws nothing then), so it never reaches a log, a pipe or an output file.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A spinner on stderr; cleared when dropped (also on an error), so that messages printed after
/// it start on a clean line.
pub struct Spinner(ProgressBar);

/// A spinner showing `msg`, ticking on its own; hidden when `quiet`.
pub fn spinner(quiet: bool, msg: &str) -> Spinner {
    if quiet {
        return Spinner(ProgressBar::hidden());
    }
    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    b.set_message(msg.to_string());
    b.enable_steady_tick(Duration::from_millis(200));
    Spinner(b)
}

impl Spinner {
    /// Replaces the step text.
    pub fn step(&self, msg: impl Into<String>) {
        self.0.set_message(msg.into());
    }

    /// Prints `msg` on stderr without garbling the spinner's line.
    pub fn warn(&self, msg: &str) {
        self.0.suspend(|| eprintln!("{msg}"));
    }

    /// Whether nothing is drawn (`--quiet`, or stderr is not a terminal).
    #[cfg(test)]
    pub fn is_hidden(&self) -> bool {
        self.0.is_hidden()
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_spinner_is_hidden() {
        assert!(spinner(true, "x").is_hidden());
        // Not a terminal under the test harness (captured stderr): hidden as well.
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            assert!(spinner(false, "x").is_hidden());
        }
    }
}
