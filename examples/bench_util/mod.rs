//! Timing helpers shared by the benchmark examples (`mod bench_util;` in each).

#![allow(dead_code)] // each example uses a subset

use std::time::Instant;

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        f64::midpoint(xs[n / 2 - 1], xs[n / 2])
    }
}

/// Peak resident set size of this process, in MB (VmHWM).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Clock ticks per second of `/proc/stat` and `/proc/self/stat` (Linux's USER_HZ).
const TICKS_PER_S: f64 = 100.0;
/// A repetition during which other processes kept more than this many cores busy is redone,
/// as the peer benchmark does (`Clean` in `shared/bench/peers/bench_peer.py`).
const MAX_OTHER_CORES: f64 = 0.1;
/// Extra tries per wanted repetition before contended ones are used after all.
const EXTRA_TRIES_FACTOR: usize = 3;
/// Longest wait for a quiet CPU after a contended repetition.
const QUIET_WAIT_S: f64 = 60.0;

/// (all cores' busy ticks, this process's ticks) now, or `None` off Linux.
fn cpu_ticks() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let vals: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let busy = vals.iter().sum::<f64>() - vals.get(3)? - vals.get(4)?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = own.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let own = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((busy, own))
}

/// CPU seconds other processes used between two [`cpu_ticks`] readings.
fn other_busy_s(a: Option<(f64, f64)>, b: Option<(f64, f64)>) -> f64 {
    match (a, b) {
        (Some((busy_a, own_a)), Some((busy_b, own_b))) => {
            (((busy_b - busy_a) - (own_b - own_a)) / TICKS_PER_S).max(0.0)
        }
        _ => 0.0,
    }
}

/// Waits (up to [`QUIET_WAIT_S`]) until other processes use under [`MAX_OTHER_CORES`] for two
/// one-second windows in a row.
fn wait_quiet() {
    let started = Instant::now();
    let mut quiet = 0;
    while started.elapsed().as_secs_f64() < QUIET_WAIT_S && quiet < 2 {
        let a = cpu_ticks();
        std::thread::sleep(std::time::Duration::from_secs(1));
        quiet = if other_busy_s(a, cpu_ticks()) < MAX_OTHER_CORES {
            quiet + 1
        } else {
            0
        };
    }
}

/// Wall-clock seconds of `reps` runs of `f` after `warmup` untimed ones, with the peer's
/// contention filter: a run during which other processes used more than [`MAX_OTHER_CORES`]
/// (and at least 2 clock ticks) is discarded and redone after a wait for a quiet CPU, up to
/// [`EXTRA_TRIES_FACTOR`] × `reps` extra runs; if clean runs are still missing, the least
/// contended discarded ones fill in. Discards are reported on stderr.
pub fn timed(
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut clean = Vec::with_capacity(reps);
    let mut dirty: Vec<(f64, f64)> = Vec::new();
    let mut tries = 0;
    while clean.len() < reps && tries < reps * (1 + EXTRA_TRIES_FACTOR) {
        let before = cpu_ticks();
        let started = Instant::now();
        f()?;
        let secs = started.elapsed().as_secs_f64();
        let other = other_busy_s(before, cpu_ticks());
        tries += 1;
        if other <= (MAX_OTHER_CORES * secs).max(2.0 / TICKS_PER_S) {
            clean.push(secs);
        } else {
            dirty.push((secs, other / secs));
            wait_quiet();
        }
    }
    if !dirty.is_empty() {
        eprintln!(
            "  ({} contended repetitions redone; other processes used up to {:.2} cores)",
            dirty.len(),
            dirty.iter().map(|d| d.1).fold(0.0, f64::max)
        );
    }
    if clean.len() < reps {
        dirty.sort_by(|a, b| a.1.total_cmp(&b.1));
        clean.extend(dirty.iter().take(reps - clean.len()).map(|d| d.0));
    }
    Ok(clean)
}

/// Wall-clock seconds of `reps` runs of `f`, each kept whatever else ran, with the cores other
/// processes kept busy during it: for runs too long to redo (minutes) where [`timed`]'s filter
/// would repeat them; the caller reports the contention beside the times.
pub fn timed_once_each(
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut secs, mut other_cores) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let before = cpu_ticks();
        let started = Instant::now();
        f()?;
        let s = started.elapsed().as_secs_f64();
        other_cores.push(other_busy_s(before, cpu_ticks()) / s.max(1e-9));
        secs.push(s);
    }
    Ok((secs, other_cores))
}
