//! The data-path table: one row per measure, one cell per target, each cell the samples of every
//! round (median and range printed) or the reason it failed.
use std::fmt::Write as _;

/// What is measured, in the order of the table's columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Client straight to the server pod.
    Direct,
    /// Through the agent (captured, transparent).
    Agent,
    /// HAProxy as an explicit proxy in the node namespace.
    Haproxy,
    /// nginx as an explicit proxy in the node namespace.
    Nginx,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Direct,
        Target::Agent,
        Target::Haproxy,
        Target::Nginx,
    ];
    /// The proxies (no process to measure for `Direct`).
    pub const PROXIES: [Target; 3] = [Target::Agent, Target::Haproxy, Target::Nginx];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Agent => "agent",
            Target::Haproxy => "HAProxy",
            Target::Nginx => "nginx",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which way a figure is better, for the ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One cell: samples (one per round) or why it failed.
#[derive(Debug, Clone, Default)]
pub enum Cell {
    /// Not measured for this target (e.g. L4 rows for the HTTP proxies).
    #[default]
    NotApplicable,
    Samples(Vec<f64>),
    Failed(String),
}

impl Cell {
    pub fn median(&self) -> Option<f64> {
        match self {
            Cell::Samples(v) if !v.is_empty() => {
                let mut s = v.clone();
                s.sort_by(f64::total_cmp);
                let n = s.len();
                Some(if n % 2 == 1 {
                    s[n / 2]
                } else {
                    (s[n / 2 - 1] + s[n / 2]) / 2.0
                })
            }
            _ => None,
        }
    }

    fn range(&self) -> Option<(f64, f64)> {
        match self {
            Cell::Samples(v) if !v.is_empty() => Some((
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )),
            _ => None,
        }
    }
}

/// A row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub unit: Unit,
    pub better: Better,
    pub cells: [Cell; 4],
}

/// How a row's numbers are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Requests per second.
    PerSecond,
    /// Microseconds.
    Micros,
    /// Gbit/s.
    Gbits,
    /// KiB, shown as MB (RSS).
    Kib,
    /// KB per connection.
    KbEach,
    /// Nanoseconds.
    Nanos,
    /// Milliseconds (of CPU per GB moved).
    Millis,
    /// A plain count.
    Count,
    /// Percent.
    Percent,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::PerSecond if v >= 10_000.0 => format!("{:.1}k", v / 1000.0),
            Unit::PerSecond => format!("{v:.0}"),
            Unit::Micros if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
            Unit::Micros => format!("{v:.0} us"),
            Unit::Gbits => format!("{v:.2} Gbit/s"),
            Unit::Kib => format!("{:.1} MB", v / 1024.0),
            Unit::KbEach => format!("{v:.1} KB"),
            Unit::Nanos => format!("{v:.0} ns"),
            Unit::Millis => format!("{v:.0} ms"),
            Unit::Count => format!("{v:.1}"),
            Unit::Percent => format!("{v:.1} %"),
        }
    }

    /// A range `lo-hi` with the unit once.
    fn show_range(self, lo: f64, hi: f64) -> String {
        let (a, b) = (self.show(lo), self.show(hi));
        match (a.split_once(' '), b.split_once(' ')) {
            (Some((an, au)), Some((bn, bu))) if au == bu => format!("{an}-{bn} {au}"),
            _ => format!("{a}-{b}"),
        }
    }
}

impl Row {
    pub fn new(name: impl Into<String>, unit: Unit, better: Better) -> Self {
        Row {
            name: name.into(),
            unit,
            better,
            cells: Default::default(),
        }
    }

    pub fn cell(&self, t: Target) -> &Cell {
        &self.cells[t.index()]
    }

    /// Adds one round's sample for `t`; a failure replaces the cell for good (the row says
    /// `failed` with the first reason rather than a median of the rounds that worked).
    pub fn push(&mut self, t: Target, sample: anyhow::Result<f64>) {
        let cell = &mut self.cells[t.index()];
        match (sample, &mut *cell) {
            (_, Cell::Failed(_)) => {}
            (Ok(v), Cell::Samples(s)) => s.push(v),
            (Ok(v), Cell::NotApplicable) => *cell = Cell::Samples(vec![v]),
            (Err(e), _) => {
                // One line on the console (a peer's whole log is in the report's cell).
                let why = format!("{e:#}").replace('\n', " | ");
                let short: String = why.chars().take(240).collect();
                eprintln!("  {} / {}: failed: {short}", self.name, t.name());
                *cell = Cell::Failed(format!("{e:#}"));
            }
        }
    }

    pub fn failures(&self) -> impl Iterator<Item = (Target, &str)> {
        Target::ALL.into_iter().filter_map(|t| match self.cell(t) {
            Cell::Failed(why) => Some((t, why.as_str())),
            _ => None,
        })
    }

    /// `median [min-max]`, or `failed`, or `-`.
    pub fn show(&self, t: Target) -> String {
        match self.cell(t) {
            Cell::NotApplicable => "-".into(),
            Cell::Failed(_) => "failed".into(),
            c @ Cell::Samples(v) => {
                let (m, (lo, hi)) = (
                    c.median().unwrap_or(f64::NAN),
                    c.range().unwrap_or((0.0, 0.0)),
                );
                if v.len() == 1 || self.unit.show(lo) == self.unit.show(hi) {
                    self.unit.show(m)
                } else {
                    format!("{} [{}]", self.unit.show(m), self.unit.show_range(lo, hi))
                }
            }
        }
    }

    /// How `t` compares with `other` on medians, as "better is above 1": for a
    /// higher-is-better row t/other, else other/t.
    pub fn ratio(&self, t: Target, other: Target) -> Option<f64> {
        let (a, b) = (self.cell(t).median()?, self.cell(other).median()?);
        let r = match self.better {
            Better::Higher => a / b,
            Better::Lower => b / a,
        };
        r.is_finite().then_some(r)
    }
}

/// The table as Markdown: the values, then the agent's ratios to direct and to each peer.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| | {} | agent/direct | agent/HAProxy | agent/nginx |",
        Target::ALL.map(Target::name).join(" | ")
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let ratio = |o| {
            r.ratio(Target::Agent, o)
                .map_or("-".to_string(), |v| format!("{v:.2}x"))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.name,
            Target::ALL.map(|t| r.show(t)).join(" | "),
            ratio(Target::Direct),
            ratio(Target::Haproxy),
            ratio(Target::Nginx),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_shows_median_and_range() {
        let mut r = Row::new("rps", Unit::PerSecond, Better::Higher);
        for v in [25_000.0, 27_000.0, 26_000.0] {
            r.push(Target::Agent, Ok(v));
        }
        r.push(Target::Haproxy, Ok(50_000.0));
        assert_eq!(r.show(Target::Agent), "26.0k [25.0k-27.0k]");
        assert_eq!(r.show(Target::Haproxy), "50.0k");
        assert_eq!(r.show(Target::Nginx), "-");
        assert_eq!(r.ratio(Target::Agent, Target::Haproxy), Some(0.52));
    }

    #[test]
    fn a_failed_round_fails_the_cell() {
        let mut r = Row::new("p99", Unit::Micros, Better::Lower);
        r.push(Target::Agent, Ok(500.0));
        r.push(
            Target::Agent,
            Err(anyhow::anyhow!("wrk: 3 non-2xx responses")),
        );
        r.push(Target::Agent, Ok(400.0));
        r.push(Target::Direct, Ok(250.0));
        assert_eq!(r.show(Target::Agent), "failed");
        assert_eq!(r.failures().count(), 1);
        assert_eq!(r.ratio(Target::Direct, Target::Direct), Some(1.0));
        assert_eq!(r.show(Target::Direct), "250 us");
    }
}
