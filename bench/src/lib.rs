//! Helpers shared by hetmem's benchmarks: baselines and the ratio table printed after a run.

use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Bytes in one page.
pub const PAGE: usize = 4096;

/// Two page-aligned host buffers and a random pairing of their pages, for memcpy baselines.
pub struct Baseline {
    src: Vec<u8>,
    dst: Vec<u8>,
    /// `(source page, destination page)` for the scattered case.
    pub pairs: Vec<(usize, usize)>,
}

impl Baseline {
    /// Buffers of `bytes` each, filled, and a random page pairing.
    pub fn new(bytes: usize) -> Baseline {
        let src: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
        let dst = vec![1u8; bytes];
        let pages = bytes / PAGE;
        let mut dsts: Vec<usize> = (0..pages).collect();
        dsts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(11));
        Baseline {
            src,
            dst,
            pairs: (0..pages).zip(dsts).collect(),
        }
    }

    /// One memcpy of the whole buffer.
    pub fn contiguous(&mut self) {
        self.dst.copy_from_slice(&self.src);
        std::hint::black_box(&self.dst);
    }

    /// One memcpy per page, in the scattered pairing.
    pub fn scattered(&mut self) {
        for &(s, d) in &self.pairs {
            self.dst[d * PAGE..(d + 1) * PAGE].copy_from_slice(&self.src[s * PAGE..(s + 1) * PAGE]);
        }
        std::hint::black_box(&self.dst);
    }
}

/// Mean time in nanoseconds of a finished criterion benchmark, from its saved estimates.
pub fn criterion_mean_ns(group: &str, bench: &str) -> Option<f64> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = dir
        .join("criterion")
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    // The file is small JSON: {"mean":{"confidence_interval":{...},"point_estimate":N,...
    let at = text.find("\"mean\"")?;
    let rest = &text[at..];
    let p = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let num: String = rest[p..]
        .chars()
        .take_while(|c| {
            c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == 'E' || *c == '-' || *c == '+'
        })
        .collect();
    num.parse().ok()
}

/// Prints `name`, GB/s and the ratio to `baseline` for each row `(name, group, bench, baseline bench)`.
pub fn print_ratios(title: &str, bytes: u64, rows: &[(&str, &str, &str, &str)]) {
    println!("\n{title}");
    println!("{:<44} {:>10} {:>12}", "case", "GB/s", "x baseline");
    for &(name, group, bench, base) in rows {
        let (Some(t), Some(b)) = (
            criterion_mean_ns(group, bench),
            criterion_mean_ns(group, base),
        ) else {
            println!("{name:<44} {:>10} {:>12}", "-", "-");
            continue;
        };
        println!("{name:<44} {:>10.2} {:>12.2}", bytes as f64 / t, b / t);
    }
}
