//! Progress on stderr for the long steps of commands that have no natural counter (a spinner with
//! the elapsed time and the current step). Hidden with `--quiet` and whenever stderr is not a
//! terminal (indicatif draws nothing then), so it never reaches a log, a pipe or an output file.

use std::time::Duration;

use std::cell::RefCell;

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

/// The CLI's view of the pipeline's progress: notices on stderr, a spinner for steps without a
/// counter (when given one), a bar over the prompts of a trace; nothing but warnings when `quiet`.
pub struct CliProgress {
    quiet: bool,
    spinner: Option<Spinner>,
    bar: RefCell<Option<ProgressBar>>,
}

impl CliProgress {
    /// Notices and the trace's prompt bar (no spinner).
    pub fn new(quiet: bool) -> Self {
        CliProgress {
            quiet,
            spinner: None,
            bar: RefCell::new(None),
        }
    }

    /// With a spinner showing `msg` (hidden when `quiet`).
    pub fn with_spinner(quiet: bool, msg: &str) -> Self {
        CliProgress {
            quiet,
            spinner: Some(spinner(quiet, msg)),
            bar: RefCell::new(None),
        }
    }
}

impl moe_xray_pipeline::Progress for CliProgress {
    fn message(&self, msg: &str) {
        if !self.quiet {
            match &self.spinner {
                Some(s) => s.warn(msg),
                None => eprintln!("{msg}"),
            }
        }
    }
    fn step(&self, msg: &str) {
        if let Some(s) = &self.spinner {
            s.step(msg);
        }
    }
    fn warn(&self, msg: &str) {
        match &self.spinner {
            Some(s) => s.warn(msg),
            None => eprintln!("{msg}"),
        }
    }
    fn prompts_begin(&self, total: u64) {
        if self.quiet {
            return;
        }
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} prompts  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        *self.bar.borrow_mut() = Some(b);
    }
    fn prompt_done(&self, tokens_per_second: f64) {
        if let Some(b) = &*self.bar.borrow() {
            b.set_message(format!("{tokens_per_second:.1} tok/s"));
            b.inc(1);
        }
    }
    fn prompts_end(&self) {
        if let Some(b) = self.bar.borrow_mut().take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for CliProgress {
    fn drop(&mut self) {
        if let Some(b) = self.bar.get_mut().take() {
            b.finish_and_clear();
        }
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
