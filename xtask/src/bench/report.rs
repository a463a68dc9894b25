//! What a full run leaves behind: `bench/results/latest.md` (the table, the agent's ratios,
//! the machine), and PNG plots of the latency distributions and of RSS, drawn with the soak's
//! chart code.
use std::{fmt::Write as _, path::Path};

use super::{data_path::Results, table};
use crate::{
    soak::chart::{self, Canvas, Rgb},
    util::output,
};

const COLOURS: [Rgb; 4] = [chart::GREY, chart::BLUE, chart::ORANGE, chart::GREEN];

/// Writes `latest.md`, `latency.png` and `rss.png` into `dir`.
pub fn write(dir: &Path, results: &Results, plan_note: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut s = String::new();
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let _ = writeln!(s, "# Data-path benchmark: latest run\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench --only data-path`, {} ({plan_note}). Median over rounds, \
         [min-max] when they differ. Ratios are the agent's medians against each column, \
         above 1 when the agent is better (higher req/s and Gbit/s, lower latency, CPU and \
         memory). See `bench/README.md` for what each row means.\n",
        date.trim()
    );
    s.push_str(&table::markdown(&results.rows));
    if let Some(added) = added_latency(results) {
        let _ = writeln!(s, "\n{added}");
    }
    let failures: Vec<String> = results
        .rows
        .iter()
        .flat_map(|r| {
            r.failures()
                .map(move |(t, why)| format!("- {} / {}: {}", r.name, t.name(), first_line(why)))
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\n## Failed cells\n\n{}", failures.join("\n"));
    }
    let _ = writeln!(s, "\n## Machine\n\n{}", machine());
    let _ = writeln!(
        s,
        "\nPlots: `latency.png` (latency percentiles at 1,000 req/s, per target, from the \
         constant-rate client), `rss.png` (RSS of each proxy idle, at 1,000 req/s, after load)."
    );
    std::fs::write(dir.join("latest.md"), &s)?;
    latency_plot(results).save_png(&dir.join("latency.png"))?;
    rss_plot(results).save_png(&dir.join("rss.png"))?;
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// "Added p99 over direct" lines from the constant-rate rows (the goal's figure).
pub fn added_latency(results: &Results) -> Option<String> {
    let mut lines = Vec::new();
    for r in results
        .rows
        .iter()
        .filter(|r| r.name.starts_with("p99 at ") && r.name.ends_with("req/s"))
    {
        let direct = r.cell(table::Target::Direct).median()?;
        let parts: Vec<String> = table::Target::PROXIES
            .iter()
            .filter_map(|&t| {
                let m = r.cell(t).median()?;
                Some(format!("{} {:+.0} us", t.name(), m - direct))
            })
            .collect();
        lines.push(format!(
            "- added {} over direct: {}",
            r.name,
            parts.join(", ")
        ));
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// Kernel, CPU, cores and the peers' and load generators' versions.
pub fn machine() -> String {
    let first = |program: &str, args: &[&str]| -> String {
        let out = std::process::Command::new(program).args(args).output();
        out.map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            first_line(text.trim()).to_string()
        })
        .unwrap_or_else(|e| format!("{program}: {e}"))
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let wrk = first("wrk", &["-v"]);
    [
        format!("- kernel: {}", first("uname", &["-r"])),
        format!(
            "- CPU: {cpu}, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        format!("- HAProxy: {}", first("haproxy", &["-v"])),
        format!("- nginx: {}", first("nginx", &["-v"])),
        format!("- wrk: {wrk}"),
        format!("- h2load: {}", first("h2load", &["--version"])),
        format!("- iperf3: {}", first("iperf3", &["--version"])),
        format!(
            "- load average at the end: {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        ),
    ]
    .join("\n")
}

/// Latency against percentile (x: 0 at p0, then one tick per nine: p90, p99, p99.9).
fn latency_plot(results: &Results) -> Canvas {
    const W: i64 = 1200;
    const H: i64 = 700;
    const LEFT: i64 = 100;
    const RIGHT: i64 = 40;
    const TOP: i64 = 50;
    const BOTTOM: i64 = 110;
    let mut c = Canvas::new(W as usize, H as usize);
    let nines_max = 3.0f64;
    let x_of = |q: f64| -> f64 { (-(1.0 - q).max(1e-3).log10()).min(nines_max) / nines_max };
    // Up to p99.9: the slowest 0.1 % of a few thousand requests is a handful of samples.
    let y_max = results
        .curves
        .iter()
        .filter_map(|(_, v)| v.get(((v.len() as f64 - 1.0) * 0.999) as usize))
        .fold(100.0f64, |a, b| a.max(*b))
        * 1.1;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let px = |x: f64| LEFT + (x * pw as f64).round() as i64;
    let py = |y: f64| TOP + ph - ((y / y_max).min(1.0) * ph as f64).round() as i64;
    c.text(
        LEFT,
        TOP - 35,
        "LATENCY AT 1,000 REQ/S (US) BY PERCENTILE",
        chart::BLACK,
        2,
    );
    y_grid(&mut c, y_max, 6.0, (LEFT, W - RIGHT), py);
    for (q, label) in [
        (0.0, "P0"),
        (0.5, "P50"),
        (0.9, "P90"),
        (0.99, "P99"),
        (0.999, "P99.9"),
    ] {
        let x = px(x_of(q));
        c.line((x, TOP), (x, TOP + ph), chart::GRID, 1);
        c.text(
            x - Canvas::text_width(label, 2) / 2,
            TOP + ph + 8,
            label,
            chart::BLACK,
            2,
        );
    }
    for (t, v) in &results.curves {
        let colour = COLOURS[*t as usize];
        let n = v.len();
        if n < 2 {
            continue;
        }
        let points: Vec<(i64, i64)> = (0..=300)
            .map(|i| {
                let x = f64::from(i) / 300.0;
                let q = 1.0 - 10f64.powf(-x * nines_max);
                let idx = (((n - 1) as f64) * q).round() as usize;
                (px(x), py(v[idx.min(n - 1)]))
            })
            .collect();
        for w in points.windows(2) {
            c.line(w[0], w[1], colour, 2);
        }
    }
    c.line((LEFT, TOP), (LEFT, TOP + ph), chart::BLACK, 1);
    c.line((LEFT, TOP + ph), (W - RIGHT, TOP + ph), chart::BLACK, 1);
    legend(&mut c, H - 40, results.curves.iter().map(|(t, _)| *t));
    c
}

/// RSS of each proxy, idle / at 1,000 req/s / after load, as grouped bars (MB).
fn rss_plot(results: &Results) -> Canvas {
    const W: i64 = 900;
    const H: i64 = 500;
    const LEFT: i64 = 90;
    const TOP: i64 = 50;
    const PH: i64 = 330;
    let mut c = Canvas::new(W as usize, H as usize);
    c.text(
        LEFT,
        TOP - 35,
        "RSS (MB): IDLE, AT 1,000 REQ/S, AFTER LOAD",
        chart::BLACK,
        2,
    );
    let y_max = results
        .rss
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().map(|k| k / 1024.0))
        .fold(1.0f64, f64::max)
        * 1.15;
    let py = |mb: f64| TOP + PH - ((mb / y_max) * PH as f64).round() as i64;
    y_grid(&mut c, y_max, 5.0, (LEFT, W - 30), py);
    let group_w = (W - LEFT - 30) / 3;
    for (g, phase) in ["IDLE", "1,000 REQ/S", "AFTER LOAD"].iter().enumerate() {
        let x0 = LEFT + g as i64 * group_w + 20;
        for (i, (t, v)) in results.rss.iter().enumerate() {
            let Some(kib) = v[g] else { continue };
            let x = x0 + i as i64 * 60;
            c.rect(x, py(kib / 1024.0), x + 45, TOP + PH, COLOURS[*t as usize]);
            let label = format!("{:.0}", kib / 1024.0);
            c.text(x + 4, py(kib / 1024.0) - 18, &label, chart::BLACK, 2);
        }
        c.text(x0, TOP + PH + 10, phase, chart::BLACK, 2);
    }
    c.line((LEFT, TOP + PH), (W - 30, TOP + PH), chart::BLACK, 1);
    legend(&mut c, H - 40, results.rss.iter().map(|(t, _)| *t));
    c
}

fn legend(c: &mut Canvas, y: i64, targets: impl Iterator<Item = table::Target>) {
    let mut x = 100;
    for t in targets {
        let label = t.name();
        c.rect(x, y + 4, x + 16, y + 8, COLOURS[t as usize]);
        c.text(x + 22, y, label, chart::BLACK, 2);
        x += 22 + Canvas::text_width(label, 2) + 30;
    }
}

/// Horizontal grid lines with their values on the left, about `ticks` of them up to `y_max`,
/// across the plot from `left` to `right`.
fn y_grid(
    c: &mut Canvas,
    y_max: f64,
    ticks: f64,
    (left, right): (i64, i64),
    py: impl Fn(f64) -> i64,
) {
    let step = chart::nice_step(y_max / ticks);
    let mut y = 0.0;
    while y <= y_max {
        c.line((left, py(y)), (right, py(y)), chart::GRID, 1);
        let label = format!("{y:.0}");
        c.text(
            left - 10 - Canvas::text_width(&label, 2),
            py(y) - 7,
            &label,
            chart::BLACK,
            2,
        );
        y += step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::table::{Better, Row, Target, Unit};

    #[test]
    fn writes_the_table_the_machine_and_both_plots() {
        let mut p99 = Row::new("p99 at 1,000 req/s", Unit::Micros, Better::Lower);
        for (t, v) in [
            (Target::Direct, 200.0),
            (Target::Agent, 500.0),
            (Target::Haproxy, 550.0),
        ] {
            p99.push(t, Ok(v));
        }
        p99.push(
            Target::Nginx,
            Err(anyhow::anyhow!("nginx exited\nlog line")),
        );
        let curve: Vec<f64> = (0..1000).map(f64::from).collect();
        let results = Results {
            rows: vec![p99],
            curves: vec![(Target::Direct, curve.clone()), (Target::Agent, curve)],
            rss: vec![(Target::Agent, [Some(15_000.0), Some(20_000.0), None])],
        };
        let dir = std::env::temp_dir().join(format!("bench-report-test-{}", std::process::id()));
        write(&dir, &results, "test").expect("written");
        let md = std::fs::read_to_string(dir.join("latest.md")).expect("latest.md");
        assert!(
            md.contains(
                "| p99 at 1,000 req/s | 200 us | 500 us | 550 us | failed | 0.40x | 1.10x | - |"
            ),
            "{md}"
        );
        assert!(
            md.contains("added p99 at 1,000 req/s over direct: agent +300 us, HAProxy +350 us"),
            "{md}"
        );
        assert!(
            md.contains("- p99 at 1,000 req/s / nginx: nginx exited\n"),
            "{md}"
        );
        assert!(md.contains("- kernel: "), "{md}");
        for png in ["latency.png", "rss.png"] {
            let bytes = std::fs::read(dir.join(png)).expect("png");
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{png}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
