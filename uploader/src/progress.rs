//! Progress bars for the interactive commands (restore, check, forget/prune, init): indicatif
//! bars on stderr when it is a terminal, rustic_core's log lines otherwise. The daemon logs
//! per-batch lines through `tracing` instead.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use rustic_core::{Progress, ProgressBars, ProgressType, RusticProgress};

/// indicatif bars for rustic_core's progress reports.
#[derive(Clone, Copy, Debug)]
pub struct TerminalBars;

impl ProgressBars for TerminalBars {
    fn progress(&self, kind: ProgressType, prefix: &str) -> Progress {
        let template = match kind {
            ProgressType::Spinner => "{spinner} {prefix:30} {elapsed}",
            ProgressType::Counter => "{prefix:30} {wide_bar} {pos}/{len} {elapsed}/{eta}",
            ProgressType::Bytes => "{prefix:30} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        };
        let bar = ProgressBar::new(0)
            .with_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
        bar.set_prefix(prefix.to_string());
        if matches!(kind, ProgressType::Spinner) {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        Progress::new(Bar { bar, bytes: matches!(kind, ProgressType::Bytes) })
    }
}

#[derive(Debug)]
struct Bar {
    bar: ProgressBar,
    bytes: bool,
}

impl RusticProgress for Bar {
    fn is_hidden(&self) -> bool {
        false
    }
    fn set_length(&self, len: u64) {
        self.bar.set_length(len);
    }
    fn set_title(&self, title: &str) {
        self.bar.set_prefix(title.to_string());
    }
    fn inc(&self, inc: u64) {
        self.bar.inc(inc);
    }
    fn finish(&self) {
        let done =
            if self.bytes { HumanBytes(self.bar.position()).to_string() } else { self.bar.position().to_string() };
        self.bar.finish_with_message(done);
    }
}

/// Whether interactive progress bars should be drawn (stderr is a terminal).
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}
