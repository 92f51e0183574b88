//! The comparison as markdown tables, JSON and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::compare::{KindFigures, OpFigures, Report, SizeResult};

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
            "| **utmem/plain** | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | {:.3} | | |",
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
        if let (Some(p), Some(u)) = (&s.plain.redis_benchmark, &s.utmem.redis_benchmark) {
            let rb_row = |out: &mut String, name: &str, f: &OpFigures| {
                let _ = writeln!(
                    out,
                    "| {name} (redis-benchmark) | {:.0} | {} µs | {} µs | {:.1} µs | | | |",
                    f.ops, f.p50_us, f.p99_us, f.main_cpu_us
                );
            };
            rb_row(&mut out, "SET", &p.set);
            rb_row(&mut out, "UTMEM.SET", &u.set);
            rb_row(&mut out, "GET", &p.get);
            rb_row(&mut out, "UTMEM.GET", &u.get);
            let _ = writeln!(
                out,
                "| **utmem/plain (redis-benchmark)** | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | SET {:.2}, GET {:.2} | | | |",
                ratio(u.set.ops, p.set.ops),
                ratio(u.get.ops, p.get.ops),
                ratio(f64::from(u.set.p50_us), f64::from(p.set.p50_us)),
                ratio(f64::from(u.get.p50_us), f64::from(p.get.p50_us)),
                ratio(f64::from(u.set.p99_us), f64::from(p.set.p99_us)),
                ratio(f64::from(u.get.p99_us), f64::from(p.get.p99_us)),
                ratio(u.set.main_cpu_us, p.set.main_cpu_us),
                ratio(u.get.main_cpu_us, p.get.main_cpu_us),
            );
        }
        out.push('\n');
    }
    out
}

/// A ratio line of the chart: its label, colour, dashed, and the ratio at a size (if any).
type RatioLine = (&'static str, RGBColor, bool, fn(&SizeResult) -> Option<f64>);

/// A memory line: label, colour, and bytes at a size.
type MemLine = (&'static str, RGBColor, fn(&SizeResult) -> f64);

const ORANGE: RGBColor = RGBColor(230, 120, 0);
const GREEN: RGBColor = RGBColor(0, 140, 60);
const GREY: RGBColor = RGBColor(110, 110, 110);

fn ratio_of(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// "1 KiB" at x = 10 (log2 of the size), nothing between powers of two.
fn log2_label(x: &f64) -> String {
    let p = x.round();
    if (x - p).abs() > 1e-6 || !(0.0..=40.0).contains(&p) {
        return String::new();
    }
    let bytes = 2f64.powf(p);
    if bytes >= (1 << 20) as f64 {
        format!("{} MiB", bytes / (1 << 20) as f64)
    } else if bytes >= 1024.0 {
        format!("{} KiB", bytes / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// Three panels side by side: UTMEM.SET / SET and UTMEM.GET / GET (ops/s ratios per
/// value size, a line at 1.0 = as fast as plain Redis), then Redis `used_memory` per
/// size for plain and utmem (log scale) with the bytes the host pool took.
pub fn svg(r: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1500, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(56);
    title.draw(&Text::new(
        format!(
            "utmem vs plain Redis {} — {} clients, {} round(s), module options: {}",
            r.redis,
            r.clients,
            r.rounds,
            options_text(&r.module_options)
        ),
        (20, 12),
        ("sans-serif", 22).into_font().color(&BLACK),
    ))?;
    title.draw(&Text::new(
        format!(
            "{}; ratio = utmem ops/s ÷ plain ops/s, higher is better",
            r.machine
        ),
        (20, 36),
        ("sans-serif", 15).into_font().color(&GREY),
    ))?;
    let panels = body.split_evenly((1, 3));
    let xs: Vec<f64> = r.sizes.iter().map(|s| (s.size as f64).log2()).collect();
    let (x0, x1) = (
        xs.first().copied().unwrap_or(10.0) - 0.5,
        xs.last().copied().unwrap_or(20.0) + 0.5,
    );
    // One label position per power of two in range (a few dozen at most).
    let n_labels = r.sizes.first().zip(r.sizes.last()).map_or(12, |(a, b)| {
        let log = |n: &usize| n.checked_ilog2().unwrap_or(0);
        usize::try_from(log(&b.size).saturating_sub(log(&a.size))).unwrap_or(0) + 2
    });
    // Grid lines at every power of two, labels only at the sizes measured (they would
    // overlap at every power).
    let size_label = |x: &f64| {
        if xs.iter().any(|m| (m - x).abs() < 1e-6) {
            log2_label(x)
        } else {
            String::new()
        }
    };
    let set_lines: [RatioLine; 2] = [
        ("utmem-bench generator", BLUE, false, |s| {
            ratio_of(s.utmem.set.ops, s.plain.set.ops)
        }),
        ("redis-benchmark", ORANGE, true, |s| {
            let (u, p) = (
                s.utmem.redis_benchmark.as_ref()?,
                s.plain.redis_benchmark.as_ref()?,
            );
            ratio_of(u.set.ops, p.set.ops)
        }),
    ];
    let get_lines: [RatioLine; 2] = [
        ("utmem-bench generator", BLUE, false, |s| {
            ratio_of(s.utmem.get.ops, s.plain.get.ops)
        }),
        ("redis-benchmark", ORANGE, true, |s| {
            let (u, p) = (
                s.utmem.redis_benchmark.as_ref()?,
                s.plain.redis_benchmark.as_ref()?,
            );
            ratio_of(u.get.ops, p.get.ops)
        }),
    ];
    for (area, caption, lines) in [
        (&panels[0], "UTMEM.SET ÷ SET (ops/s)", set_lines),
        (&panels[1], "UTMEM.GET ÷ GET (ops/s)", get_lines),
    ] {
        let top = r
            .sizes
            .iter()
            .flat_map(|s| lines.iter().filter_map(move |l| (l.3)(s)))
            .fold(1.5f64, f64::max)
            * 1.45; // headroom for the legend, top left
        let mut c = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(48)
            .build_cartesian_2d(x0..x1, 0.0..top)?;
        c.configure_mesh()
            .x_labels(n_labels)
            .x_label_formatter(&size_label)
            .y_label_formatter(&|y| format!("{y:.1}"))
            .x_desc("value size")
            .y_desc("utmem ÷ plain")
            .label_style(("sans-serif", 14))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        c.draw_series(LineSeries::new(
            [(x0, 1.0), (x1, 1.0)],
            BLACK.stroke_width(2),
        ))?
        .label("1.0 = plain Redis")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        for (name, color, dashed, f) in lines {
            let pts: Vec<(f64, f64)> = r
                .sizes
                .iter()
                .zip(&xs)
                .filter_map(|(s, x)| f(s).map(|v| (*x, v)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let style = color.stroke_width(3);
            if dashed {
                c.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))?
            } else {
                c.draw_series(LineSeries::new(pts.clone(), style))?
            }
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            c.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
            let dy = if dashed { 14 } else { -16 };
            c.draw_series(pts.iter().map(|&(x, y)| {
                EmptyElement::at((x, y))
                    + Text::new(
                        format!("{y:.2}"),
                        (-12, dy),
                        ("sans-serif", 13).into_font().color(&color),
                    )
            }))?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(GREY)
            .draw()?;
    }
    let mib = |b: f64| (b / (1 << 20) as f64).max(0.01);
    let mem: [MemLine; 3] = [
        ("plain Redis", BLUE, |s| s.plain.used_memory as f64),
        ("Redis + utmem", RED, |s| s.utmem.used_memory as f64),
        ("utmem-hostd pool", GREEN, |s| s.utmem.pool_bytes as f64),
    ];
    let (lo, hi) = r
        .sizes
        .iter()
        .flat_map(|s| mem.iter().map(move |m| mib((m.2)(s))))
        .fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo = if lo == f64::MAX { 0.1 } else { lo / 2.0 };
    let mut m = ChartBuilder::on(&panels[2])
        .caption(
            "Memory with the keyspace filled (MiB, log)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, (lo..hi * 6.0).log_scale())?;
    m.configure_mesh()
        .x_labels(n_labels)
        .x_label_formatter(&size_label)
        .y_label_formatter(&|y| {
            if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .x_desc("value size")
        .y_desc("MiB")
        .label_style(("sans-serif", 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (name, color, f) in mem {
        let pts: Vec<(f64, f64)> = r
            .sizes
            .iter()
            .zip(&xs)
            .map(|(s, x)| (*x, mib(f(s))))
            .collect();
        let dashed = name.starts_with("utmem-hostd");
        let style = color.stroke_width(3);
        if dashed {
            m.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))?
        } else {
            m.draw_series(LineSeries::new(pts.clone(), style))?
        }
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        m.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    m.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Renders `svg` to `png` with librsvg's `rsvg-convert` (Debian's librsvg2-bin, which
/// `scripts/setup` installs): the SVG's text needs real fonts, which rsvg finds through
/// fontconfig, where a Rust bitmap backend would need its own font stack.
pub fn png(svg: &Path, png: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("rsvg-convert")
        .args(["--format", "png", "--background-color", "white", "--output"])
        .arg(png)
        .arg(svg)
        .output()
        .map_err(|e| {
            anyhow::anyhow!("cannot run rsvg-convert (apt-get install librsvg2-bin): {e}")
        })?;
    anyhow::ensure!(
        out.status.success(),
        "rsvg-convert failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::DriverFigures;

    fn op(ops: f64) -> OpFigures {
        OpFigures {
            ops,
            p50_us: 100,
            p99_us: 200,
            main_cpu_us: 5.0,
            errors: 0,
        }
    }

    fn kind(set: f64, get: f64, used: i64, rb: bool) -> KindFigures {
        KindFigures {
            set: op(set),
            get: op(get),
            used_memory: used,
            rss: used,
            pool_bytes: 0,
            redis_benchmark: rb.then(|| DriverFigures {
                set: op(set / 2.0),
                get: op(get / 2.0),
            }),
        }
    }

    fn report() -> Report {
        let sizes = [1usize << 10, 16 << 10, 1 << 20]
            .into_iter()
            .map(|size| SizeResult {
                size,
                requests: 1000,
                keyspace: 100,
                plain: kind(1000.0, 1000.0, 100 << 20, size <= 64 << 10),
                utmem: kind(500.0, 850.0, 1 << 20, size <= 64 << 10),
            })
            .collect();
        Report {
            machine: "test".into(),
            redis: "7.0.15".into(),
            clients: 50,
            rounds: 1,
            module_options: Vec::new(),
            sizes,
        }
    }

    #[test]
    fn chart_has_size_labels_ratio_panels_and_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        svg(&report(), &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for want in [
            "1 KiB",
            "16 KiB",
            "1 MiB",
            "UTMEM.SET ÷ SET",
            "UTMEM.GET ÷ GET",
            "1.0 = plain Redis",
            "0.50",
            "0.85",
            "redis-benchmark",
            "Memory with the keyspace filled",
        ] {
            assert!(text.contains(want), "{want} missing from the chart");
        }
    }

    #[test]
    fn markdown_puts_redis_benchmark_rows_beside_the_generator() {
        let md = markdown(&report());
        assert!(md.contains("| UTMEM.SET (redis-benchmark) | 250 |"), "{md}");
        assert!(md.contains("| **utmem/plain (redis-benchmark)** | SET 0.50, GET 0.85 |"));
        // 1 MiB is beyond redis-benchmark's argv limit: no such rows there.
        let mib = md.split("### 1 MiB").nth(1).unwrap();
        assert!(!mib.contains("redis-benchmark"));
    }
}
