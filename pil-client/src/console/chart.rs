//! Bar charts drawn as SVG on the server: no script, nothing fetched. Each chart has
//! a title and a description for screen readers, and the page shows its numbers as a
//! table beside it.

use std::fmt::Write;

/// One series of a bar chart: a name, a colour and one value per category.
pub struct Series {
    pub name: &'static str,
    pub colour: &'static str,
    pub values: Vec<u64>,
}

/// Colours with at least 4.5:1 contrast against white.
pub const BLUE: &str = "#1f5fa8";
pub const RED: &str = "#b3261e";
pub const GREY: &str = "#5f6368";
pub const ORANGE: &str = "#a04a00";

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const WIDTH: u32 = 720;
const LEFT: u32 = 48;
const TOP: u32 = 16;
const PLOT_H: u32 = 180;

/// Vertical bars, stacked per category, with a legend.
pub fn stacked_bars(title: &str, categories: &[String], series: &[Series]) -> String {
    let totals: Vec<u64> = (0..categories.len())
        .map(|i| {
            series
                .iter()
                .map(|s| s.values.get(i).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    // An even axis maximum, so the middle line's label is exact.
    let max = totals
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1)
        .next_multiple_of(2);
    let n = categories.len().max(1) as u32;
    let slot = (WIDTH - LEFT - 8) / n;
    let bar = (slot * 3 / 4).clamp(1, 48);
    let height = TOP + PLOT_H + 64;
    let mut svg = String::new();
    let desc = series
        .iter()
        .map(|s| format!("{}: {}", s.name, s.values.iter().sum::<u64>()))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" role="img" aria-labelledby="t-{id} d-{id}" class="chart"><title id="t-{id}">{t}</title><desc id="d-{id}">{d}</desc>"#,
        id = slug(title),
        t = escape(title),
        d = escape(&desc),
    );
    // Axis with the maximum and half of it.
    for (value, y) in [(max, TOP), (max / 2, TOP + PLOT_H / 2), (0, TOP + PLOT_H)] {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{WIDTH}" y1="{y}" y2="{y}" stroke="#d0d0d0"/><text x="{x}" y="{ty}" text-anchor="end" font-size="11" fill="#333">{value}</text>"##,
            x = LEFT - 4,
            ty = y + 4,
        );
    }
    let label_every = categories.len().div_ceil(8).max(1);
    for (i, category) in categories.iter().enumerate() {
        let x = LEFT + 4 + i as u32 * slot;
        let mut y = TOP + PLOT_H;
        for s in series {
            let v = s.values.get(i).copied().unwrap_or(0);
            if v == 0 {
                continue;
            }
            let h = ((v as f64 / max as f64) * f64::from(PLOT_H))
                .round()
                .max(1.0) as u32;
            y -= h;
            let _ = write!(
                svg,
                r#"<rect x="{x}" y="{y}" width="{bar}" height="{h}" fill="{c}"><title>{cat}: {v} {name}</title></rect>"#,
                c = s.colour,
                cat = escape(category),
                name = escape(s.name),
            );
        }
        if i % label_every == 0 {
            let _ = write!(
                svg,
                r##"<text x="{tx}" y="{ty}" font-size="11" fill="#333" text-anchor="middle">{cat}</text>"##,
                tx = x + bar / 2,
                ty = TOP + PLOT_H + 14,
                cat = escape(short_label(category)),
            );
        }
    }
    let mut lx = LEFT;
    for s in series {
        let ly = TOP + PLOT_H + 36;
        let _ = write!(
            svg,
            r##"<rect x="{lx}" y="{ry}" width="12" height="12" fill="{c}"/><text x="{tx}" y="{ly}" font-size="12" fill="#222">{name}</text>"##,
            ry = ly - 10,
            tx = lx + 16,
            c = s.colour,
            name = escape(s.name),
        );
        lx += 24 + 8 * s.name.len() as u32;
    }
    svg.push_str("</svg>");
    svg
}

/// Horizontal bars, one per item, largest first as given.
pub fn horizontal_bars(title: &str, items: &[(String, u64)], colour: &str) -> String {
    let max = items.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let row = 22;
    let label_w = 300;
    let height = TOP + row * items.len().max(1) as u32 + 8;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" role="img" aria-labelledby="t-{id}" class="chart"><title id="t-{id}">{t}</title>"#,
        id = slug(title),
        t = escape(title),
    );
    for (i, (label, v)) in items.iter().enumerate() {
        let y = TOP + i as u32 * row;
        let w = ((*v as f64 / max as f64) * f64::from(WIDTH - label_w - 60))
            .round()
            .max(1.0) as u32;
        let _ = write!(
            svg,
            r##"<text x="{lx}" y="{ty}" font-size="12" fill="#222" text-anchor="end">{l}</text><rect x="{label_w}" y="{y}" width="{w}" height="{bh}" fill="{colour}"/><text x="{vx}" y="{ty}" font-size="12" fill="#222">{v}</text>"##,
            lx = label_w - 6,
            ty = y + 13,
            bh = row - 6,
            vx = label_w + w + 4,
            l = escape(&shorten(label, 44)),
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A day's label without its year (`2026-03-14` → `03-14`); other labels as given.
fn short_label(s: &str) -> &str {
    let b = s.as_bytes();
    if s.len() == 10 && b[4] == b'-' && b[7] == b'-' {
        &s[5..]
    } else {
        s
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        s.chars().take(max - 1).collect::<String>() + "…"
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_drawn_to_scale_and_text_is_escaped() {
        let svg = stacked_bars(
            "Lookups <by> decision",
            &["2026-03-14".into(), "b".into()],
            &[
                Series {
                    name: "allowed",
                    colour: BLUE,
                    values: vec![2, 1],
                },
                Series {
                    name: "denied",
                    colour: RED,
                    values: vec![0, 1],
                },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("Lookups &lt;by&gt; decision"));
        assert!(!svg.contains("<by>"));
        assert!(svg.contains(">03-14<"));
        // The tallest stack (2) fills the plot; 1 is half of it; days lose their year.
        assert!(svg.contains(&format!(r#"height="{PLOT_H}" fill="{BLUE}""#)));
        assert_eq!(
            svg.matches(&format!(r#"height="{}""#, PLOT_H / 2)).count(),
            2
        );
        let h = horizontal_bars("Top", &[("x".into(), 4), ("y".into(), 2)], BLUE);
        assert_eq!(h.matches("<rect").count(), 2);
    }
}
