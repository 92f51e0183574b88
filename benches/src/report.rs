//! The comparison as markdown tables, JSON and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::compare::{KindFigures, Report, SizeResult};

/// A line of a chart: its label, colour and the figure it plots.
type Series = (&'static str, RGBColor, fn(&SizeResult) -> f64);

fn human(n: f64) -> String {
    let a = n.abs();
    if a >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", n / (1u64 << 30) as f64)
    } else if a >= (1 << 20) as f64 {
        format!("{:.1} MiB", n / (1 << 20) as f64)
    } else if a >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

fn size_name(s: usize) -> String {
    if s >= 1 << 20 {
        format!("{} MiB", s >> 20)
    } else {
        format!("{} KiB", s >> 10)
    }
}

/// Module options as they were given, or the defaults.
pub fn options_text(o: &[(String, String)]) -> String {
    if o.is_empty() {
        return "defaults".into();
    }
    o.iter()
        .map(|(n, v)| format!("{n} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Markdown: one table per size.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machine: {}; Redis {}; {} clients; median of {} round(s) per figure; module options: {}.\n",
        r.machine,
        r.redis,
        r.clients,
        r.rounds,
        options_text(&r.module_options)
    );
    for s in &r.sizes {
        let _ = writeln!(
            out,
            "### {} values ({} requests per run, {} keys)\n",
            size_name(s.size),
            s.requests,
            s.keyspace
        );
        let _ = writeln!(
            out,
            "| | ops/s | p50 | p99 | main-thread CPU/op | used_memory | RSS | host pool |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        let row = |out: &mut String, name: &str, k: &KindFigures, get: bool| {
            let f = if get { &k.get } else { &k.set };
            let _ = writeln!(
                out,
                "| {name} | {:.0} | {} µs | {} µs | {:.1} µs | {} | {} | {} |",
                f.ops,
                f.p50_us,
                f.p99_us,
                f.main_cpu_us,
                human(k.used_memory as f64),
                human(k.rss as f64),
                human(k.pool_bytes as f64)
            );
        };
        row(&mut out, "SET", &s.plain, false);
        row(&mut out, "UTMEM.SET", &s.utmem, false);
        row(&mut out, "GET", &s.plain, true);
        row(&mut out, "UTMEM.GET", &s.utmem, true);
        let ratio = |a: f64, b: f64| a / b.max(1e-9);
        let _ = writeln!(
            out,
            "| **utmem/plain** | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | {:.3} | | |\n",
            ratio(s.utmem.set.ops, s.plain.set.ops),
            ratio(s.utmem.get.ops, s.plain.get.ops),
            ratio(f64::from(s.utmem.set.p50_us), f64::from(s.plain.set.p50_us)),
            ratio(f64::from(s.utmem.get.p50_us), f64::from(s.plain.get.p50_us)),
            ratio(f64::from(s.utmem.set.p99_us), f64::from(s.plain.set.p99_us)),
            ratio(f64::from(s.utmem.get.p99_us), f64::from(s.plain.get.p99_us)),
            ratio(s.utmem.set.main_cpu_us, s.plain.set.main_cpu_us),
            ratio(s.utmem.get.main_cpu_us, s.plain.get.main_cpu_us),
            ratio(s.utmem.used_memory as f64, s.plain.used_memory as f64),
        );
    }
    out
}

/// Two panels: ops/s and Redis memory against value size, plain vs utmem.
pub fn svg(r: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let xs: Vec<f64> = r.sizes.iter().map(|s| (s.size as f64).log2()).collect();
    let (x0, x1) = (
        xs.first().copied().unwrap_or(10.0) - 0.3,
        xs.last().copied().unwrap_or(20.0) + 0.3,
    );
    let max_ops = r
        .sizes
        .iter()
        .flat_map(|s| {
            [
                s.plain.set.ops,
                s.plain.get.ops,
                s.utmem.set.ops,
                s.utmem.get.ops,
            ]
        })
        .fold(1.0, f64::max);
    let mut c = ChartBuilder::on(&left)
        .caption("ops/s vs value size (log2 bytes)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..max_ops * 1.1)?;
    c.configure_mesh().draw()?;
    let series: [Series; 4] = [
        ("GET", BLUE, |s| s.plain.get.ops),
        ("UTMEM.GET", RED, |s| s.utmem.get.ops),
        ("SET", CYAN, |s| s.plain.set.ops),
        ("UTMEM.SET", MAGENTA, |s| s.utmem.set.ops),
    ];
    for (name, color, f) in series {
        let pts: Vec<(f64, f64)> = r.sizes.iter().zip(&xs).map(|(s, x)| (*x, f(s))).collect();
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    c.configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    let max_mem = r
        .sizes
        .iter()
        .map(|s| s.plain.used_memory.max(s.utmem.used_memory) as f64 / (1 << 20) as f64)
        .fold(1.0, f64::max);
    let mut m = ChartBuilder::on(&right)
        .caption("Redis used_memory (MiB) vs value size", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..max_mem * 1.1)?;
    m.configure_mesh().draw()?;
    let mem: [Series; 2] = [
        ("plain", BLUE, |s| {
            s.plain.used_memory as f64 / (1 << 20) as f64
        }),
        ("utmem", RED, |s| {
            s.utmem.used_memory as f64 / (1 << 20) as f64
        }),
    ];
    for (name, color, f) in mem {
        let pts: Vec<(f64, f64)> = r.sizes.iter().zip(&xs).map(|(s, x)| (*x, f(s))).collect();
        m.draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
    }
    m.configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
