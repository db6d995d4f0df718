//! What a benchmark shows while it measures: a progress bar when stderr is a
//! terminal (indicatif), one plain line otherwise, so CI logs and files piped
//! from `concord bench` stay readable instead of filling with redraws.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Waits out a measurement window of `window`, showing its progress.
///
/// The bar is driven by its own task from the clock rather than by the load
/// generators, so showing it costs the measured path nothing.
pub async fn measure(what: &str, window: Duration) {
    if !std::io::stderr().is_terminal() {
        eprintln!("bench: measuring {what} for {:.0} s", window.as_secs_f64());
        tokio::time::sleep(window).await;
        return;
    }
    let total = window.as_millis().max(1) as u64;
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        if elapsed >= window {
            break;
        }
        bar.set_position(elapsed.as_millis() as u64);
        bar.set_message(format!(
            "{:.0}/{:.0} s",
            elapsed.as_secs_f64(),
            window.as_secs_f64()
        ));
    }
    bar.finish_and_clear();
}
