//! The live display: a bar with counts and the tests running now on a terminal; one line
//! per phase and per finished test otherwise (CI logs), all on stderr.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use super::runner::{Progress, TestOutcome};

/// The display of one run.
#[derive(Debug)]
pub struct Live {
    bar: indicatif::ProgressBar,
    terminal: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: BTreeMap<String, String>,
    passed: usize,
    bad: usize,
}

impl Live {
    /// A display on stderr.
    pub fn new() -> Arc<Live> {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {prefix}  {msg}  ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Arc::new(Live { bar, terminal: std::io::stderr().is_terminal(), state: Mutex::new(State::default()) })
    }

    fn line(&self, text: &str) {
        // indicatif draws nothing off a terminal: then lines are the display.
        if self.terminal {
            self.bar.println(text);
        } else {
            eprintln!("{text}");
        }
    }

    /// A new phase (building, testing the baseline).
    pub fn phase(&self, what: &str) {
        self.bar.set_message(what.to_owned());
        self.line(&format!("testgrid: {what}"));
    }

    /// A line of a build's output (shown only on a terminal, as the bar's message).
    pub fn build_line(&self, line: &str) {
        if self.terminal {
            self.bar.set_message(line.chars().take(70).collect::<String>());
        }
    }

    /// The module tests begin: `count` of them.
    pub fn tests(&self, count: usize) {
        self.bar.set_length(count as u64);
        self.bar.set_position(0);
        self.phase(&format!("running {count} tests"));
    }

    /// The display is done.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn redraw(&self, state: &State) {
        self.bar.set_prefix(format!("passed {} failed {}", state.passed, state.bad));
        let names: Vec<&str> = state.running.keys().map(String::as_str).collect();
        self.bar.set_message(format!("running: {}", names.join(", ")));
    }
}

impl Progress for Live {
    fn started(&self, name: &str, node: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.running.insert(name.to_owned(), node.to_owned());
            self.redraw(&s);
        }
    }

    fn finished(&self, outcome: &TestOutcome) {
        if let Ok(mut s) = self.state.lock() {
            s.running.remove(&outcome.name);
            if outcome.status.is_bad() {
                s.bad += 1;
            } else {
                s.passed += 1;
            }
            self.redraw(&s);
        }
        if outcome.name != "baseline" {
            self.bar.inc(1);
        }
        self.line(&format!(
            "  {:<10} {} ({:.1} s on {})",
            outcome.status.word(),
            outcome.name,
            outcome.seconds,
            outcome.node.as_deref().unwrap_or("-")
        ));
    }
}
