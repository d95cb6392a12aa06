//! Transforms between a source and the sink: JSON parsing, multiline merging, joining
//! pieces of long lines, enrichment with labels, filtering.
//!
//! Transforms change how many records there are (a stack trace of twenty lines becomes
//! one record, a filtered line none), so [`Transformed`] maps acknowledgements back: a
//! source's record counts as delivered once every record made from it, and every record
//! before it, was; one held in a merge is not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::record::{Labels, Record, Stream};
use crate::source::Source;

/// A record on its way through transforms, with the number (from 1) of the first
/// source record it holds: what lets acknowledgements find their way back.
#[derive(Clone, Debug)]
pub struct Item {
    /// The first source record this one is made of.
    pub seq: u64,
    /// The record.
    pub record: Record,
}

/// One step of a pipeline: takes records one at a time, passes on zero or more. A record
/// made of several (a merge) carries the `seq` of its first.
pub trait Transform: Send + std::fmt::Debug {
    /// Takes `item`, appending what it becomes to `out`.
    fn apply(&mut self, item: Item, out: &mut Vec<Item>);

    /// The `seq` of the oldest record held back (a merge in progress), if any.
    fn oldest_held(&self) -> Option<u64> {
        None
    }

    /// Passes on what it holds that has waited long enough (everything, when `all`).
    fn flush(&mut self, all: bool, out: &mut Vec<Item>) {
        let _ = (all, out);
    }

    /// Records it dropped on purpose so far (a filter's), for metrics.
    fn dropped(&self) -> u64 {
        0
    }
}

/// Parses lines that are JSON objects into [`Record::fields`]; with `message_field`, the
/// line becomes that field's text (`{"msg":"started","port":80}` → line `started`).
/// Lines that are not JSON objects pass unchanged and are counted.
#[derive(Debug, Default)]
pub struct ParseJson {
    message_field: Option<String>,
    not_json: u64,
}

impl ParseJson {
    /// Keeps lines as they are, adding the fields.
    pub fn new() -> Self {
        ParseJson::default()
    }

    /// Replaces the line with the text of `field` when there is one.
    pub fn message_field(mut self, field: impl Into<String>) -> Self {
        self.message_field = Some(field.into());
        self
    }

    /// Lines that were not JSON objects.
    pub fn not_json(&self) -> u64 {
        self.not_json
    }
}

impl Transform for ParseJson {
    fn apply(&mut self, item: Item, out: &mut Vec<Item>) {
        let Item { seq, mut record } = item;
        let trimmed = record.line.trim_start();
        if trimmed.starts_with('{') {
            if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(trimmed) {
                if let Some(text) = self.message_field.as_ref().and_then(|f| map.get(f)).and_then(|v| v.as_str()) {
                    record.line = text.to_owned();
                }
                record.fields = Some(Box::new(map));
                out.push(Item { seq, record });
                return;
            }
        }
        self.not_json += 1;
        out.push(Item { seq, record });
    }
}

/// Identity of a record's origin: merges never mix sources, instances or streams.
type Origin = (usize, Stream);

fn origin(r: &Record) -> Origin {
    (Arc::as_ptr(&r.labels) as usize, r.stream)
}

/// Merges lines that continue a record (the frames of a stack trace) into the record
/// they continue, per origin, joined by newlines. Which lines continue is a pattern:
/// either lines matching it start a new record ([`Multiline::starts`]) or lines matching
/// it continue one ([`Multiline::continues`]). A record is passed on when the next one
/// starts, at `max_lines` or `max_bytes`, or after `timeout` without a new line.
#[derive(Debug)]
pub struct Multiline {
    pattern: regex::Regex,
    /// Whether a match means "continues" (else it means "starts").
    match_continues: bool,
    max_lines: usize,
    max_bytes: usize,
    timeout: Duration,
    pending: HashMap<Origin, (Item, usize, Instant)>,
}

impl Multiline {
    /// Records start at lines matching `pattern` (`^\d{4}-\d{2}-\d{2}` for lines that
    /// begin with a date); at most 500 lines and 1 MiB per record, passed on after 1 s
    /// without a new line.
    pub fn starts(pattern: &str) -> Result<Self> {
        Self::build(pattern, false)
    }

    /// Lines matching `pattern` continue the record before them (`^\s` for indented
    /// continuations); limits as for [`Multiline::starts`].
    pub fn continues(pattern: &str) -> Result<Self> {
        Self::build(pattern, true)
    }

    fn build(pattern: &str, match_continues: bool) -> Result<Self> {
        let compiled = regex::Regex::new(pattern).map_err(|e| Error::InvalidInput {
            field: "multiline pattern",
            value: pattern.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Multiline {
            pattern: compiled,
            match_continues,
            max_lines: 500,
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(1),
            pending: HashMap::new(),
        })
    }

    /// Sets the limits: lines and bytes per merged record, and the wait for more.
    pub fn limits(mut self, max_lines: usize, max_bytes: usize, timeout: Duration) -> Self {
        self.max_lines = max_lines.max(1);
        self.max_bytes = max_bytes.max(1);
        self.timeout = timeout;
        self
    }

    /// Stack traces of Java and most JVM languages: frames are indented, and `...` and
    /// `Caused by:` lines continue the trace too.
    pub fn java() -> Self {
        // The pattern is a constant that compiles.
        Multiline::continues(r"^(\s|\.\.\.|Caused by:)").unwrap_or_else(|_| unreachable!())
    }

    fn continues_record(&self, line: &str) -> bool {
        self.pattern.is_match(line) == self.match_continues
    }
}

impl Transform for Multiline {
    fn apply(&mut self, item: Item, out: &mut Vec<Item>) {
        let key = origin(&item.record);
        let continues = self.continues_record(&item.record.line);
        match self.pending.remove(&key) {
            Some((mut merged, lines, _))
                if continues && lines < self.max_lines && merged.record.line.len() + 1 + item.record.line.len() <= self.max_bytes =>
            {
                merged.record.line.push('\n');
                merged.record.line.push_str(&item.record.line);
                merged.record.partial = item.record.partial;
                self.pending.insert(key, (merged, lines + 1, Instant::now()));
            }
            held => {
                out.extend(held.map(|(r, _, _)| r));
                self.pending.insert(key, (item, 1, Instant::now()));
            }
        }
    }

    fn oldest_held(&self) -> Option<u64> {
        self.pending.values().map(|(i, _, _)| i.seq).min()
    }

    fn flush(&mut self, all: bool, out: &mut Vec<Item>) {
        let wait = if all { Duration::ZERO } else { self.timeout };
        let due: Vec<Origin> = self.pending.iter().filter(|(_, (_, _, at))| at.elapsed() >= wait).map(|(k, _)| *k).collect();
        let mut flushed: Vec<Item> = due.into_iter().filter_map(|k| self.pending.remove(&k)).map(|(r, _, _)| r).collect();
        flushed.sort_by_key(|i| i.seq);
        out.extend(flushed);
    }
}

/// Joins the pieces of a line that was cut (Docker's 16 KiB pieces, lines over
/// [`crate::MAX_LINE_BYTES`]) back into one record, up to `max_bytes`; a longer line
/// stays in pieces, each still marked partial but the last.
#[derive(Debug)]
pub struct JoinPartial {
    max_bytes: usize,
    timeout: Duration,
    pending: HashMap<Origin, (Item, Instant)>,
}

impl JoinPartial {
    /// Joins lines up to `max_bytes` (1 MiB is a sane bound); a piece whose rest does
    /// not come within 1 s (the writer died mid-line) is passed on as it is.
    pub fn new(max_bytes: usize) -> Self {
        JoinPartial { max_bytes: max_bytes.max(1), timeout: Duration::from_secs(1), pending: HashMap::new() }
    }
}

impl Transform for JoinPartial {
    fn apply(&mut self, item: Item, out: &mut Vec<Item>) {
        let key = origin(&item.record);
        let item = match self.pending.remove(&key) {
            Some((mut joined, _)) if joined.record.line.len() + item.record.line.len() <= self.max_bytes => {
                joined.record.line.push_str(&item.record.line);
                joined.record.partial = item.record.partial;
                joined
            }
            Some((full, _)) => {
                out.push(full);
                item
            }
            None => item,
        };
        if item.record.partial {
            self.pending.insert(key, (item, Instant::now()));
        } else {
            out.push(item);
        }
    }

    fn oldest_held(&self) -> Option<u64> {
        self.pending.values().map(|(i, _)| i.seq).min()
    }

    fn flush(&mut self, all: bool, out: &mut Vec<Item>) {
        let wait = if all { Duration::ZERO } else { self.timeout };
        let due: Vec<Origin> = self.pending.iter().filter(|(_, (_, at))| at.elapsed() >= wait).map(|(k, _)| *k).collect();
        let mut flushed: Vec<Item> = due.into_iter().filter_map(|k| self.pending.remove(&k)).map(|(r, _)| r).collect();
        flushed.sort_by_key(|i| i.seq);
        out.extend(flushed);
    }
}

/// Sets labels on every record: the node, and extra labels (an environment, a team).
#[derive(Debug, Default)]
pub struct Enrich {
    node: Option<String>,
    extra: Vec<(String, String)>,
    /// The last labels seen and what they became, so records of one origin keep
    /// sharing one `Labels`.
    cache: Option<(Arc<Labels>, Arc<Labels>)>,
}

impl Enrich {
    /// Nothing set yet.
    pub fn new() -> Self {
        Enrich::default()
    }

    /// Sets the node label where a record has none.
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Sets an extra label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((key.into(), value.into()));
        self
    }
}

impl Transform for Enrich {
    fn apply(&mut self, item: Item, out: &mut Vec<Item>) {
        let Item { seq, mut record } = item;
        let enriched = match &self.cache {
            Some((from, to)) if Arc::ptr_eq(from, &record.labels) => to.clone(),
            _ => {
                let mut labels = (*record.labels).clone();
                if labels.node.is_none() {
                    labels.node = self.node.clone();
                }
                for (k, v) in &self.extra {
                    labels.extra.insert(k.clone(), v.clone());
                }
                let to = Arc::new(labels);
                self.cache = Some((record.labels.clone(), to.clone()));
                to
            }
        };
        record.labels = enriched;
        out.push(Item { seq, record });
    }
}

/// Keeps records whose line matches `include` (if set) and not `exclude` (if set);
/// drops the others on purpose and counts them.
#[derive(Debug, Default)]
pub struct Filter {
    include: Option<regex::Regex>,
    exclude: Option<regex::Regex>,
    dropped: u64,
}

impl Filter {
    /// A filter; each pattern is a regular expression.
    pub fn new(include: Option<&str>, exclude: Option<&str>) -> Result<Self> {
        let compile = |field: &'static str, p: &str| {
            regex::Regex::new(p).map_err(|e| Error::InvalidInput { field, value: p.to_owned(), reason: e.to_string() })
        };
        Ok(Filter {
            include: include.map(|p| compile("filter include pattern", p)).transpose()?,
            exclude: exclude.map(|p| compile("filter exclude pattern", p)).transpose()?,
            dropped: 0,
        })
    }
}

impl Transform for Filter {
    fn dropped(&self) -> u64 {
        self.dropped
    }

    fn apply(&mut self, item: Item, out: &mut Vec<Item>) {
        let line = &item.record.line;
        let keep = self.include.as_ref().is_none_or(|p| p.is_match(line)) && !self.exclude.as_ref().is_some_and(|p| p.is_match(line));
        if keep {
            out.push(item);
        } else {
            self.dropped += 1;
        }
    }
}

/// A source with transforms applied to what it reads, in order.
#[derive(Debug)]
pub struct Transformed<S> {
    inner: S,
    transforms: Vec<Box<dyn Transform>>,
    /// Read from `inner` and not yet transformed (kept across a cancelled read).
    unread: Vec<Record>,
    ready: std::collections::VecDeque<Record>,
    inner_count: u64,
    out_count: u64,
    /// (records handed out, records of `inner` accounted for once they are delivered).
    marks: std::collections::VecDeque<(u64, u64)>,
    ended: bool,
}

impl<S: Source> Transformed<S> {
    /// `inner` with `transforms` applied in order.
    pub fn new(inner: S, transforms: Vec<Box<dyn Transform>>) -> Self {
        Transformed {
            inner,
            transforms,
            unread: Vec::new(),
            ready: Default::default(),
            inner_count: 0,
            out_count: 0,
            marks: Default::default(),
            ended: false,
        }
    }

    /// Records the transforms dropped on purpose so far (filters), for metrics.
    pub fn dropped(&self) -> u64 {
        self.transforms.iter().map(|t| t.dropped()).sum()
    }

    /// Feeds `items` through the transforms in order; with `flush`, each transform also
    /// passes on what it held long enough (or everything, with `all`).
    fn run_chain(&mut self, items: Vec<Item>, flush: Option<bool>) {
        let mut carried = items;
        for t in &mut self.transforms {
            let mut next = Vec::new();
            for item in carried {
                t.apply(item, &mut next);
            }
            if let Some(all) = flush {
                t.flush(all, &mut next);
            }
            carried = next;
        }
        // What an output accounts for: every source record before the oldest one still
        // held, and before the first record of any output after it in this step.
        let held = self.transforms.iter().filter_map(|t| t.oldest_held()).min().unwrap_or(self.inner_count + 1);
        let mut covered = vec![0; carried.len()];
        let mut bound = held;
        for (i, item) in carried.iter().enumerate().rev() {
            covered[i] = bound - 1;
            bound = bound.min(item.seq);
        }
        for (item, covers) in carried.into_iter().zip(covered) {
            self.ready.push_back(item.record);
            let covers = covers.max(self.marks.back().map_or(0, |m| m.1));
            self.marks.push_back((self.out_count + self.ready.len() as u64, covers));
        }
    }
}

#[async_trait]
impl<S: Source> Source for Transformed<S> {
    fn capabilities(&self) -> crate::source::SourceCapabilities {
        self.inner.capabilities()
    }

    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        let max = max.max(1);
        loop {
            if !self.ready.is_empty() {
                let n = self.ready.len().min(max);
                batch.extend(self.ready.drain(..n));
                self.out_count += n as u64;
                return Ok(n);
            }
            if self.ended {
                return Ok(0);
            }
            if self.unread.is_empty() {
                let holding = self.transforms.iter().any(|t| t.oldest_held().is_some());
                let got = if holding {
                    // Something waits in a merge: pass it on if nothing comes for a while.
                    match tokio::time::timeout(Duration::from_millis(250), self.inner.read(&mut self.unread, max)).await {
                        Ok(got) => got?,
                        Err(_) => {
                            self.run_chain(Vec::new(), Some(false));
                            continue;
                        }
                    }
                } else {
                    self.inner.read(&mut self.unread, max).await?
                };
                if got == 0 {
                    self.ended = true;
                    self.run_chain(Vec::new(), Some(true));
                    continue;
                }
            }
            let items: Vec<Item> = std::mem::take(&mut self.unread)
                .into_iter()
                .map(|record| {
                    self.inner_count += 1;
                    Item { seq: self.inner_count, record }
                })
                .collect();
            self.run_chain(items, Some(false));
        }
    }

    async fn ack(&mut self, count: u64) -> Result<()> {
        let mut through = None;
        while self.marks.front().is_some_and(|(out, _)| *out <= count) {
            through = self.marks.pop_front().map(|(_, inner)| inner);
        }
        match through {
            Some(inner) => self.inner.ack(inner).await,
            None => Ok(()),
        }
    }
}
