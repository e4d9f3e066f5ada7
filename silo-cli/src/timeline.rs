//! Draws a migration timeline as SVG: block number against time, one mark
//! per transferred block, coloured by why it was sent (bulk pre-copy,
//! priority fetch for a destination read, dirty re-send).

use std::fmt::Write as _;

/// Why a block was transferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bulk pre-copy.
    Bulk,
    /// Asked for by the destination (NeedAt).
    Priority,
    /// Re-sent because it was written after it was sent.
    Dirty,
}

impl Kind {
    fn colour(self) -> &'static str {
        match self {
            Kind::Bulk => "#4c78a8",
            Kind::Priority => "#e45756",
            Kind::Dirty => "#f2a900",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Kind::Bulk => "bulk",
            Kind::Priority => "priority",
            Kind::Dirty => "dirty",
        }
    }
}

/// One transferred block.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// Seconds since the migration started.
    pub t: f64,
    /// Device index (devices are stacked vertically).
    pub device: usize,
    /// Block number within the device.
    pub block: u64,
    /// Why it was sent.
    pub kind: Kind,
}

/// Renders the events. `devices` gives each device's name and block count.
/// At most `max_marks` marks are drawn (evenly thinned) so the file stays
/// small for large devices.
pub fn render(
    events: &[Event],
    devices: &[(String, u64)],
    title: &str,
    max_marks: usize,
) -> String {
    let (w, h) = (1000.0f64, 600.0f64);
    let (left, right, top, bottom) = (80.0, 20.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let t_max = events.iter().map(|e| e.t).fold(0.0f64, f64::max).max(1e-3);
    let total_blocks: u64 = devices.iter().map(|d| d.1.max(1)).sum::<u64>().max(1);
    // Vertical start of each device band, in blocks.
    let mut base = Vec::with_capacity(devices.len());
    let mut acc = 0u64;
    for d in devices {
        base.push(acc);
        acc += d.1.max(1);
    }
    let y_of = |dev: usize, block: u64| {
        let b = base.get(dev).copied().unwrap_or(0) + block;
        top + ph - (b as f64 + 0.5) / total_blocks as f64 * ph
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>
"#,
        w / 2.0,
        escape(title)
    );
    // Axes.
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"##,
        top + ph,
        left + pw,
        top + ph,
        top + ph
    );
    for i in 0..=5 {
        let t = t_max * i as f64 / 5.0;
        let x = left + pw * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{t:.2}s</text>"#,
            top + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time</text>"#,
        left + pw / 2.0,
        h - 8.0
    );
    // Device bands.
    for (i, (name, blocks)) in devices.iter().enumerate() {
        let y0 = y_of(i, blocks.saturating_sub(1));
        let y1 = y_of(i, 0);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            y1 + 0.5,
            left + pw,
            y1 + 0.5,
            left - 6.0,
            (y0 + y1) / 2.0,
            escape(name)
        );
    }
    // Marks, thinned evenly but always keeping priority marks (they are few
    // and the interesting part).
    let step = (events.len() / max_marks.max(1)).max(1);
    let mark_h = (ph / total_blocks as f64).clamp(1.0, 4.0);
    for (i, e) in events.iter().enumerate() {
        if i % step != 0 && e.kind != Kind::Priority {
            continue;
        }
        // A few pixels off the axis so marks at t = 0 stay visible.
        let x = left + 3.0 + e.t / t_max * (pw - 6.0);
        let y = y_of(e.device, e.block);
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="2" height="{mark_h:.1}" fill="{}"/>"#,
            y - mark_h / 2.0,
            e.kind.colour()
        );
    }
    // Legend.
    for (i, k) in [Kind::Bulk, Kind::Priority, Kind::Dirty].iter().enumerate() {
        let x = left + 10.0 + i as f64 * 90.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            top - 14.0,
            k.colour(),
            x + 14.0,
            top - 5.0,
            k.label()
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_balanced_svg() {
        let events: Vec<Event> = (0..1000)
            .map(|i| Event {
                t: i as f64 / 100.0,
                device: i % 2,
                block: (i / 2) as u64,
                kind: if i % 50 == 0 {
                    Kind::Priority
                } else if i > 900 {
                    Kind::Dirty
                } else {
                    Kind::Bulk
                },
            })
            .collect();
        let svg = render(
            &events,
            &[("a<b".into(), 500), ("c".into(), 500)],
            "demo & test",
            200,
        );
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b") && svg.contains("demo &amp; test"));
        // priority marks are all kept
        assert_eq!(svg.matches("#e45756\"/>").count(), 20 + 1);
        assert_eq!(svg.matches("<svg").count(), 1);
    }
}
