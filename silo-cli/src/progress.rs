//! Live progress: indicatif bars (per device and total, with rate and ETA)
//! when stdout is a terminal, plain periodic lines otherwise. The display
//! polls the group, so nothing runs on the migration's I/O path.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use silo_devicegroup::DeviceGroup;

use crate::util::human_bytes;

/// Which side of a migration is displayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Sender: blocks migrated by the migrators.
    Send,
    /// Receiver: blocks present in the waiting caches.
    Receive,
}

/// Bytes done and total of each device, in group order.
pub fn snapshot(group: &DeviceGroup, side: Side) -> Vec<(String, u64, u64)> {
    match side {
        Side::Send => group
            .progress()
            .into_iter()
            .map(|p| {
                let total = group
                    .provider_at(p.index)
                    .map(|d| d.size())
                    .unwrap_or(p.progress.total_blocks * p.block_size);
                let done = (p.progress.migrated_blocks * p.block_size).min(total);
                (p.name, done, total)
            })
            .collect(),
        Side::Receive => group
            .names()
            .into_iter()
            .map(|n| {
                let total = group.provider(&n).map(|d| d.size()).unwrap_or(0);
                let bs = group.schema(&n).map(|s| s.block_size_bytes()).unwrap_or(1);
                let present = group
                    .metrics(&n)
                    .and_then(|m| m.waiting)
                    .map(|w| w.remote_present + w.local_present)
                    .unwrap_or(0);
                ((n), (present * bs).min(total), total)
            })
            .collect(),
    }
}

/// A running progress display; [`Display::finish`] draws the final state.
pub struct Display {
    task: tokio::task::JoinHandle<()>,
    group: Arc<DeviceGroup>,
    side: Side,
    bars: Option<(MultiProgress, Vec<ProgressBar>, ProgressBar)>,
    started: Instant,
}

impl Display {
    /// Starts displaying `group`'s progress.
    pub fn start(group: Arc<DeviceGroup>, side: Side) -> Display {
        let tty = std::io::stdout().is_terminal();
        let started = Instant::now();
        let bars = tty.then(|| {
            let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
            let style = ProgressStyle::with_template(
                "{prefix:>12} [{bar:40.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("static template")
            .progress_chars("=> ");
            let snap = snapshot(&group, side);
            let devs: Vec<ProgressBar> = snap
                .iter()
                .map(|(n, _, t)| {
                    let b = mp.add(ProgressBar::new(*t));
                    b.set_style(style.clone());
                    b.set_prefix(n.clone());
                    b
                })
                .collect();
            let total = mp.add(ProgressBar::new(snap.iter().map(|s| s.2).sum()));
            total.set_style(style.clone());
            total.set_prefix("total");
            (mp, devs, total)
        });
        let task = {
            let group = group.clone();
            let bars = bars.clone();
            tokio::spawn(async move {
                let period = if bars.is_some() {
                    Duration::from_millis(200)
                } else {
                    Duration::from_secs(1)
                };
                let mut tick = tokio::time::interval(period);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    draw(&group, side, bars.as_ref(), started);
                }
            })
        };
        Display {
            task,
            group,
            side,
            bars,
            started,
        }
    }

    /// Stops the display after drawing the final state.
    pub fn finish(self) {
        self.task.abort();
        draw(&self.group, self.side, self.bars.as_ref(), self.started);
        if let Some((_, devs, total)) = &self.bars {
            for b in devs {
                b.finish();
            }
            total.finish();
            // The bars leave the cursor at the end of the last one.
            crate::out("");
        }
    }
}

fn draw(
    group: &DeviceGroup,
    side: Side,
    bars: Option<&(MultiProgress, Vec<ProgressBar>, ProgressBar)>,
    started: Instant,
) {
    let snap = snapshot(group, side);
    let done: u64 = snap.iter().map(|s| s.1).sum();
    let total: u64 = snap.iter().map(|s| s.2).sum();
    match bars {
        Some((_, devs, t)) => {
            for (b, s) in devs.iter().zip(&snap) {
                b.set_position(s.1);
            }
            t.set_position(done);
        }
        None => {
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let rate = done as f64 / secs;
            let pct = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            let eta = if rate > 0.0 && done < total {
                format!("{:.0}s", (total - done) as f64 / rate)
            } else {
                "-".into()
            };
            let per: Vec<String> = snap
                .iter()
                .map(|(n, d, t)| {
                    format!("{n} {}/{}", human_bytes(*d as f64), human_bytes(*t as f64))
                })
                .collect();
            #[allow(clippy::print_stdout)] // progress lines are the output
            {
                println!(
                    "progress: {pct:5.1}% {} of {} at {}/s, ETA {eta} [{}]",
                    human_bytes(done as f64),
                    human_bytes(total as f64),
                    human_bytes(rate),
                    per.join(", ")
                );
            }
        }
    }
}
