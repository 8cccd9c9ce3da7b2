//! Progress of long work: a bar with an ETA on a terminal, and plain lines (at most one every
//! few seconds, and one at the end) when stderr is a file or a pipe, so that CI logs and
//! `2> log` show it too.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct Progress {
    what: String,
    unit: &'static str,
    bar: Option<ProgressBar>,
    hidden: bool,
    started: Instant,
    last_line: Option<Instant>,
    done: u64,
    total: u64,
}

impl Progress {
    /// `what` names the work ("scoring"), `unit` its items ("windows").
    pub(crate) fn new(what: &str, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            let template =
                format!("{what} {{bar:40}} {{pos}}/{{len}} {unit} ({{elapsed}} elapsed, ETA {{eta}}) {{msg}}");
            b.set_style(ProgressStyle::with_template(&template).expect("valid template"));
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Self {
            what: what.into(),
            unit,
            bar,
            hidden: false,
            started: Instant::now(),
            last_line: None,
            done: 0,
            total: 0,
        }
    }

    /// Nothing is shown (`--json` runs that keep stderr quiet).
    pub(crate) fn hidden() -> Self {
        Self { hidden: true, ..Self::new("", "") }
    }

    pub(crate) fn set_message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }

    pub(crate) fn update(&mut self, done: u64, total: u64) {
        (self.done, self.total) = (done, total);
        if self.hidden {
            return;
        }
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
            return;
        }
        let due = self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY);
        if due && done < total {
            self.line();
        }
    }

    fn line(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = match self.done {
            0 => "unknown".to_string(),
            d => format!("{:.0} s", elapsed / d as f64 * (self.total.saturating_sub(d)) as f64),
        };
        let pct = if self.total > 0 { 100.0 * self.done as f64 / self.total as f64 } else { 0.0 };
        eprintln!(
            "{}: {}/{} {} ({pct:.0}%), {elapsed:.0} s elapsed, ETA {eta}",
            self.what, self.done, self.total, self.unit
        );
        self.last_line = Some(Instant::now());
    }

    /// The work ended: clear the bar, or write the last line.
    pub(crate) fn finish(mut self) {
        match self.bar.take() {
            Some(b) => b.finish_and_clear(),
            None if !self.hidden && self.total > 0 => {
                let elapsed = self.started.elapsed().as_secs_f64();
                eprintln!("{}: {}/{} {} done in {elapsed:.1} s", self.what, self.done, self.total, self.unit);
            }
            None => {}
        }
    }
}
