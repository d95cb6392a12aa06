//! What a testgrid run leaves behind: `report.html` (summary, one row per test, a click
//! on a row shows its stdout and stderr apart), `junit.xml` for CI systems, and each
//! test's whole output as `logs/<test>.stdout.txt` and `.stderr.txt`.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::runner::{Captured, Status, TestOutcome};
use super::TestgridError;

/// The most of one stream the HTML page holds; the rest is in the log files it links.
pub const PAGE_BYTES_PER_STREAM: usize = 256 * 1024;

/// A whole run, as the report shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The suite's folder.
    pub suite: String,
    /// `full` or `quick`.
    pub mode: String,
    /// The run's job id.
    pub job: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Wall time, in seconds.
    pub seconds: f64,
    /// The snapshot used.
    pub snapshot: String,
    /// What was built for this run or reused, in a sentence.
    pub snapshot_note: String,
    /// The baseline's own test: run now (full) or remembered from the run that made the
    /// snapshot (quick).
    pub baseline: Option<TestOutcome>,
    /// Which modules were selected, in a sentence, when not all.
    pub selection: Option<String>,
    /// One per module test.
    pub tests: Vec<TestOutcome>,
}

/// Counts by status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Passed.
    pub passed: usize,
    /// Failed.
    pub failed: usize,
    /// Timed out.
    pub timed_out: usize,
    /// Skipped.
    pub skipped: usize,
}

impl RunReport {
    /// Counts of the module tests.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for t in &self.tests {
            match t.status {
                Status::Passed => c.passed += 1,
                Status::Failed { .. } => c.failed += 1,
                Status::TimedOut => c.timed_out += 1,
                Status::Skipped { .. } => c.skipped += 1,
            }
        }
        c
    }

    /// Whether everything that ran passed (and the baseline's test, if run now).
    pub fn passed(&self) -> bool {
        !self.tests.iter().chain(&self.baseline).any(|t| t.status.is_bad() || matches!(t.status, Status::Skipped { .. }))
    }

    /// Writes `report.html`, `junit.xml`, `report.json` and `logs/` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), TestgridError> {
        let io = |what: &str| {
            let context = format!("writing {what} in {}", dir.display());
            move |source| TestgridError::Io { context, source }
        };
        std::fs::create_dir_all(dir.join("logs")).map_err(io("logs/"))?;
        for t in self.tests.iter().chain(&self.baseline) {
            std::fs::write(dir.join("logs").join(format!("{}.stdout.txt", t.name)), &t.stdout.text).map_err(io("logs/"))?;
            std::fs::write(dir.join("logs").join(format!("{}.stderr.txt", t.name)), &t.stderr.text).map_err(io("logs/"))?;
        }
        std::fs::write(dir.join("report.html"), self.html()).map_err(io("report.html"))?;
        std::fs::write(dir.join("junit.xml"), self.junit()).map_err(io("junit.xml"))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| io("report.json")(std::io::Error::other(e)))?;
        std::fs::write(dir.join("report.json"), json).map_err(io("report.json"))
    }

    /// The HTML page: no outside resources, so it opens from a CI artifact as it is.
    pub fn html(&self) -> String {
        let c = self.counts();
        let mut page = String::with_capacity(64 * 1024);
        let _ = write!(
            page,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>testgrid: {suite}</title>\n<style>{STYLE}</style></head><body>\n\
             <h1>testgrid report</h1>\n<p class=\"meta\">suite <code>{suite}</code> · mode {mode} · job <code>{job}</code> · started {started} · {seconds:.1} s</p>\n\
             <p class=\"meta\">snapshot <code>{snapshot}</code>: {note}</p>\n",
            suite = esc(&self.suite),
            mode = esc(&self.mode),
            job = esc(&self.job),
            started = esc(&self.started_at),
            seconds = self.seconds,
            snapshot = esc(&self.snapshot),
            note = esc(&self.snapshot_note),
        );
        if let Some(selection) = &self.selection {
            let _ = writeln!(page, "<p class=\"meta\">{}</p>", esc(selection));
        }
        let _ = writeln!(
            page,
            "<table id=\"summary\"><tr><th>total</th><th>passed</th><th>failed</th><th>timed out</th><th>skipped</th></tr>\n\
             <tr><td id=\"count-total\">{}</td><td id=\"count-passed\">{}</td><td id=\"count-failed\">{}</td><td id=\"count-timed-out\">{}</td><td id=\"count-skipped\">{}</td></tr></table>",
            self.tests.len(),
            c.passed,
            c.failed,
            c.timed_out,
            c.skipped
        );
        page.push_str("<h2>baseline</h2>\n");
        match &self.baseline {
            Some(b) => table(&mut page, "baseline", std::slice::from_ref(b)),
            None => page.push_str("<p>The baseline has no test of its own.</p>\n"),
        }
        page.push_str("<h2>modules</h2>\n<p class=\"hint\">Click a row to show its output.</p>\n");
        table(&mut page, "tests", &self.tests);
        let _ = write!(page, "<script>{SCRIPT}</script>\n</body></html>\n");
        page
    }

    /// JUnit XML as Jenkins, GitLab and GitHub's test reporters read it.
    pub fn junit(&self) -> String {
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let all: Vec<&TestOutcome> = self.baseline.iter().chain(&self.tests).collect();
        let failures = all.iter().filter(|t| t.status.is_bad()).count();
        let skipped = all.iter().filter(|t| matches!(t.status, Status::Skipped { .. })).count();
        let _ = writeln!(
            xml,
            "<testsuites name=\"testgrid\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{:.3}\">",
            all.len(),
            self.seconds
        );
        let _ = writeln!(
            xml,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{:.3}\" timestamp=\"{}\">",
            esc(&self.suite),
            all.len(),
            self.seconds,
            esc(&self.started_at)
        );
        for t in all {
            let class = if self.baseline.as_ref().is_some_and(|b| std::ptr::eq(b, t)) { "baseline" } else { "modules" };
            let _ = write!(xml, "    <testcase classname=\"testgrid.{class}\" name=\"{}\" time=\"{:.3}\">", esc(&t.name), t.seconds);
            match &t.status {
                Status::Passed => {}
                Status::Failed { code } => {
                    let code =
                        code.map_or_else(|| "no exit code (a signal, or it could not start)".to_owned(), |c| format!("exit code {c}"));
                    let _ = write!(xml, "<failure type=\"failed\" message=\"{}\"/>", esc(&code));
                }
                Status::TimedOut => {
                    let _ = write!(xml, "<failure type=\"timeout\" message=\"stopped at its time limit\"/>");
                }
                Status::Skipped { reason } => {
                    let _ = write!(xml, "<skipped message=\"{}\"/>", esc(reason));
                }
            }
            if !t.stdout.text.is_empty() {
                let _ = write!(xml, "<system-out>{}</system-out>", esc(&t.stdout.text));
            }
            if !t.stderr.text.is_empty() {
                let _ = write!(xml, "<system-err>{}</system-err>", esc(&t.stderr.text));
            }
            xml.push_str("</testcase>\n");
        }
        xml.push_str("  </testsuite>\n</testsuites>\n");
        xml
    }
}

fn table(page: &mut String, id: &str, tests: &[TestOutcome]) {
    let _ = writeln!(page, "<table id=\"{id}\" class=\"tests\"><tr><th>test</th><th>status</th><th>duration</th><th>node</th></tr>");
    for t in tests {
        let name = esc(&t.name);
        let detail = match &t.status {
            Status::Failed { code: Some(c) } => format!(" (exit {c})"),
            Status::Skipped { reason } => format!(" ({})", esc(reason)),
            _ => String::new(),
        };
        let class = t.status.word().replace(' ', "-");
        let _ = writeln!(
            page,
            "<tr class=\"test {class}\" data-test=\"{name}\"><td>{name}</td><td class=\"status\">{}{detail}</td><td>{:.1} s</td><td>{}</td></tr>",
            t.status.word(),
            t.seconds,
            esc(t.node.as_deref().unwrap_or("-"))
        );
        let _ = write!(page, "<tr class=\"output\" id=\"output-{name}\" hidden><td colspan=\"4\">");
        if let Some(note) = &t.truncation {
            let _ = write!(page, "<p class=\"cut\">Output incomplete: {}</p>", esc(note));
        }
        stream(page, &t.name, "stdout", &t.stdout);
        stream(page, &t.name, "stderr", &t.stderr);
        page.push_str("</td></tr>\n");
    }
    page.push_str("</table>\n");
}

fn stream(page: &mut String, test: &str, which: &str, captured: &Captured) {
    let _ = write!(page, "<h3>{which} <span class=\"lines\">{} lines</span></h3>", captured.lines);
    let text = &captured.text;
    let shown = if text.len() > PAGE_BYTES_PER_STREAM {
        // The end is what explains a failure: keep it, on a char boundary.
        let mut start = text.len() - PAGE_BYTES_PER_STREAM;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let cut_lines = text[..start].matches('\n').count();
        let _ = write!(
            page,
            "<p class=\"cut\">The first {cut_lines} lines ({start} bytes) are not on this page: the whole {which} is in <a href=\"logs/{0}.{which}.txt\">logs/{0}.{which}.txt</a>.</p>",
            esc(test)
        );
        &text[start..]
    } else {
        text.as_str()
    };
    let _ = write!(page, "<pre class=\"{which}\">{}</pre>", esc(shown));
}

/// Text for HTML and XML 1.0 element content and attribute values: escaped, and the
/// characters XML cannot hold at all (most control characters, such as a terminal's
/// escape sequences) shown as `\u{..}`.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || matches!(c, '\u{FFFE}' | '\u{FFFF}') => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #ccc;padding:0.3em 0.7em;text-align:left}\
tr.test{cursor:pointer}tr.passed td.status{color:#176f2c}tr.failed td.status,tr.timed-out td.status{color:#b3261e;font-weight:bold}\
tr.skipped td.status{color:#777}pre{background:#f6f6f6;padding:0.5em;max-height:40em;overflow:auto;white-space:pre-wrap}\
pre.stderr{background:#fff3f2}.cut{color:#8a5300}.meta,.hint{color:#555}h3{margin:0.5em 0 0.2em;font-size:1em}.lines{color:#777;font-weight:normal}";

const SCRIPT: &str = "document.querySelectorAll('tr.test').forEach(function(row){\
row.addEventListener('click',function(){var out=document.getElementById('output-'+row.dataset.test);\
if(out){out.hidden=!out.hidden;}});});";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html_and_xml() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(esc("a\u{1b}[31mred\tb<"), "a\\u{1b}[31mred\tb&lt;");
    }
}
