//! The chart: six small panels of grouped bars (one colour per path, the median as
//! the bar, min–max as a whisker, the value written on top), drawn with plotters'
//! SVG backend, so that no system library or font file is needed.

use std::path::Path as FsPath;

use anyhow::anyhow;
use plotters::{
    coord::Shift,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{
    Figure,
    proxy::Path,
    report::{Context, Summary, num},
};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 780;
const HEADER: u32 = 84;
const FONT: &str = "sans-serif";

fn color(path: Path) -> RGBColor {
    match path {
        Path::Direct => RGBColor(0x9a, 0x9a, 0x9a),
        Path::Sockmap => RGBColor(0x1f, 0x5f, 0xb4),
        Path::Packet => RGBColor(0x2a, 0x9d, 0x5c),
        Path::Userspace => RGBColor(0x8c, 0xb8, 0xe6),
        Path::Haproxy => RGBColor(0xe8, 0x7d, 0x1e),
    }
}

/// A panel: a title, and groups of bars (a label, the figure, a factor to the unit).
struct Panel {
    title: &'static str,
    groups: &'static [(&'static str, Figure, f64)],
}

const PANELS: [Panel; 6] = [
    Panel {
        title: "Throughput, Gbit/s (higher is better)",
        groups: &[
            ("1 stream", Figure::Bulk1Gbps, 1.0),
            ("8 streams", Figure::Bulk8Gbps, 1.0),
        ],
    },
    Panel {
        title: "CPU s per GiB moved (lower is better)",
        groups: &[
            ("1 stream", Figure::Bulk1Cpu, 1.0),
            ("8 streams", Figure::Bulk8Cpu, 1.0),
        ],
    },
    Panel {
        title: "64-byte round trip, µs (lower is better)",
        groups: &[
            ("p50", Figure::RrP50, 1.0),
            ("p99", Figure::RrP99, 1.0),
            ("p99.9", Figure::RrP999, 1.0),
        ],
    },
    Panel {
        title: "Short sessions per second (higher is better)",
        groups: &[("banner, QUIT, 221, close", Figure::SessRate, 1.0)],
    },
    Panel {
        title: "Time per short session, ms (lower is better)",
        groups: &[("p99", Figure::SessP99, 1.0)],
    },
    Panel {
        title: "Memory per held connection, KiB (lower is better)",
        groups: &[
            ("proxy RSS", Figure::ScaleProxyRss, 1.0 / 1024.0),
            ("kernel slab, all sockets", Figure::ScaleKernel, 1.0),
        ],
    },
];

pub fn draw(file: &FsPath, context: &Context, summary: &Summary) -> anyhow::Result<()> {
    let root = SVGBackend::new(file, (WIDTH, HEIGHT)).into_drawing_area();
    draw_all(&root, context, summary)
        .and_then(|()| root.present().map_err(|e| e.to_string()))
        .map_err(|e| anyhow!("drawing {}: {e}", file.display()))
}

fn draw_all(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    context: &Context,
    summary: &Summary,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let s = &context.settings;
    let title = format!(
        "kgate against HAProxy and the direct path: median of {} run{} (bar), min to max (whisker)",
        s.reps,
        if s.reps == 1 { "" } else { "s" }
    );
    root.draw(&Text::new(
        title,
        (20, 14),
        (FONT, 20, FontStyle::Bold).into_font().color(&BLACK),
    ))
    .map_err(e)?;
    let subtitle = format!(
        "{}; {}; HAProxy {}{}{}",
        context.date,
        context.machine.summary(),
        context.machine.haproxy,
        if s.quick {
            "; quick run (small sizes)"
        } else {
            ""
        },
        match context.failures.len() {
            0 => String::new(),
            n => format!("; {n} failed their checks and are left out (see results.md)"),
        }
    );
    root.draw(&Text::new(
        subtitle,
        (20, 40),
        (FONT, 13).into_font().color(&RGBColor(0x44, 0x44, 0x44)),
    ))
    .map_err(e)?;
    let mut x = 20;
    for path in Path::ALL {
        root.draw(&Rectangle::new(
            [(x, 62), (x + 14, 76)],
            color(path).filled(),
        ))
        .map_err(e)?;
        root.draw(&Text::new(
            path.label(),
            (x + 20, 62),
            (FONT, 14).into_font().color(&BLACK),
        ))
        .map_err(e)?;
        x += 40 + 9 * path.label().len() as i32;
    }

    let (_, body) = root.split_vertically(HEADER);
    for (area, panel) in body.split_evenly((2, 3)).iter().zip(&PANELS) {
        draw_panel(area, panel, summary).map_err(e)?;
    }
    Ok(())
}

type AreaResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel,
    summary: &Summary,
) -> AreaResult {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let (x0, x1, y0, y1) = (62, w - 14, 44, h - 38);
    area.draw(&Text::new(
        panel.title,
        (14, 10),
        (FONT, 15, FontStyle::Bold).into_font().color(&BLACK),
    ))?;

    // (median, min, max) per group and path, in the panel's unit.
    let values: Vec<Vec<Option<(f64, f64, f64)>>> = panel
        .groups
        .iter()
        .map(|&(_, figure, factor)| {
            Path::ALL
                .iter()
                .map(|&p| {
                    summary
                        .get(figure, p)
                        .map(|s| (s.median * factor, s.min * factor, s.max * factor))
                })
                .collect()
        })
        .collect();
    let top = values
        .iter()
        .flatten()
        .flatten()
        .map(|v| v.2.max(v.0))
        .fold(0.0f64, f64::max);
    let (ymax, step) = axis(top);
    let y_of = |v: f64| y1 - ((v.max(0.0) / ymax) * f64::from(y1 - y0)).round() as i32;

    let grid = RGBColor(0xe4, 0xe4, 0xe4);
    let small = |size: i32, h: HPos, v: VPos| {
        TextStyle::from((FONT, size).into_font())
            .color(&BLACK)
            .pos(Pos::new(h, v))
    };
    let mut tick = 0.0;
    for _ in 0..=20 {
        if tick > ymax + step / 2.0 {
            break;
        }
        let y = y_of(tick);
        area.draw(&PathElement::new(vec![(x0, y), (x1, y)], grid))?;
        area.draw(&Text::new(
            num(tick),
            (x0 - 6, y),
            small(12, HPos::Right, VPos::Center),
        ))?;
        tick += step;
    }
    area.draw(&PathElement::new(vec![(x0, y0), (x0, y1), (x1, y1)], BLACK))?;

    let groups = panel.groups.len() as i32;
    let group_w = (x1 - x0) / groups;
    let bars = Path::ALL.len() as i32;
    let bar_w = group_w * 8 / 10 / bars;
    for (g, (label, _, _)) in panel.groups.iter().enumerate() {
        let gx = x0 + g as i32 * group_w;
        area.draw(&Text::new(
            *label,
            (gx + group_w / 2, y1 + 8),
            small(13, HPos::Center, VPos::Top),
        ))?;
        for (b, path) in Path::ALL.iter().enumerate() {
            let bx = gx + group_w / 10 + b as i32 * bar_w;
            let center = bx + bar_w / 2;
            match values[g][b] {
                Some((median, min, max)) => {
                    area.draw(&Rectangle::new(
                        [(bx + 1, y_of(median)), (bx + bar_w - 1, y1)],
                        color(*path).filled(),
                    ))?;
                    if max > min {
                        let whisker = RGBColor(0x22, 0x22, 0x22);
                        area.draw(&PathElement::new(
                            vec![(center, y_of(min)), (center, y_of(max))],
                            whisker,
                        ))?;
                        for v in [min, max] {
                            area.draw(&PathElement::new(
                                vec![(center - 4, y_of(v)), (center + 4, y_of(v))],
                                whisker,
                            ))?;
                        }
                    }
                    area.draw(&Text::new(
                        num(median),
                        (center, y_of(max.max(median)) - 3),
                        small(11, HPos::Center, VPos::Bottom),
                    ))?;
                }
                None => {
                    area.draw(&Text::new(
                        "n/a",
                        (center, y1 - 3),
                        small(11, HPos::Center, VPos::Bottom),
                    ))?;
                }
            }
        }
    }
    Ok(())
}

/// The axis top and tick step for values up to `top`: a round step (1, 2 or 5 times
/// a power of ten) giving about 5 ticks, with room above the highest value for its label.
fn axis(top: f64) -> (f64, f64) {
    let top = if top > 0.0 && top.is_finite() {
        top * 1.12
    } else {
        1.0
    };
    let rough = top / 5.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * magnitude);
    ((top / step).ceil() * step, step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_a_round_tick_above_the_highest_value() {
        assert_eq!(axis(18.6), (25.0, 5.0));
        assert_eq!(axis(0.0), (1.0, 0.2));
        let (top, step) = axis(1234.0);
        assert!(top >= 1234.0 * 1.12 && step == 500.0, "{top} {step}");
    }
}
