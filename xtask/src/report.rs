//! `cargo xtask bench-report`: reads criterion's saved results and writes
//! `target/hetmem-report/report.md`: for every benchmark group, each case's time, throughput
//! and ratio to the memcpy baseline measured in the same group (the same run).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// One measured case.
struct Case {
    mean_ns: f64,
    /// Bytes (or elements) per iteration, and whether they are bytes.
    throughput: Option<(f64, bool)>,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn read_case(dir: &Path) -> Option<Case> {
    let est: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("new/estimates.json")).ok()?)
            .ok()?;
    let mean_ns = est["mean"]["point_estimate"].as_f64()?;
    let bench: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("new/benchmark.json")).ok()?)
            .ok()?;
    let t = &bench["throughput"];
    let throughput = t["Bytes"]
        .as_f64()
        .map(|b| (b, true))
        .or_else(|| t["Elements"].as_f64().map(|e| (e, false)));
    Some(Case {
        mean_ns,
        throughput,
    })
}

/// The memcpy case a case is compared with, within its group.
fn baseline<'a>(case: &str, names: &'a [String]) -> Option<&'a String> {
    let memcpys: Vec<&String> = names.iter().filter(|n| n.starts_with("memcpy")).collect();
    if case.contains("scattered") {
        if let Some(s) = memcpys.iter().find(|n| n.contains("scattered")) {
            return Some(s);
        }
    }
    memcpys
        .iter()
        .find(|n| !n.contains("scattered"))
        .or(memcpys.first())
        .copied()
}

pub fn run(machine: Option<String>, copy_to: Option<PathBuf>) -> Result<()> {
    let root = target_dir().join("criterion");
    let mut groups: BTreeMap<String, BTreeMap<String, Case>> = BTreeMap::new();
    for g in std::fs::read_dir(&root).with_context(|| {
        format!(
            "no criterion results in {} (run cargo bench)",
            root.display()
        )
    })? {
        let g = g?;
        if !g.file_type()?.is_dir() || g.file_name() == "report" {
            continue;
        }
        for c in std::fs::read_dir(g.path())? {
            let c = c?;
            if let Some(case) = read_case(&c.path()) {
                groups
                    .entry(g.file_name().to_string_lossy().into_owned())
                    .or_default()
                    .insert(c.file_name().to_string_lossy().into_owned(), case);
            }
        }
    }
    let mut md = String::new();
    writeln!(md, "# hetmem benchmark report\n")?;
    writeln!(
        md,
        "Machine: {} ({} cores). Generated from criterion's results by `cargo xtask bench-report`. \
         Ratios compare each case with the memcpy of the same bytes measured in the same group \
         (same run); above 1 is faster than memcpy.\n",
        machine.as_deref().unwrap_or("not given"),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    for (group, cases) in &groups {
        let names: Vec<String> = cases.keys().cloned().collect();
        writeln!(md, "## {group}\n")?;
        writeln!(md, "| case | mean | throughput | x memcpy |")?;
        writeln!(md, "|---|---:|---:|---:|")?;
        for (name, c) in cases {
            let thr = match c.throughput {
                Some((b, true)) => format!("{:.2} GB/s", b / c.mean_ns),
                Some((e, false)) => format!("{:.1} ns/elem", c.mean_ns / e),
                None => "-".into(),
            };
            let ratio = baseline(name, &names)
                .filter(|b| *b != name)
                .and_then(|b| cases.get(b))
                .map_or("-".into(), |b| format!("{:.2}", b.mean_ns / c.mean_ns));
            writeln!(
                md,
                "| {name} | {:.3} ms | {thr} | {ratio} |",
                c.mean_ns / 1e6
            )?;
        }
        writeln!(md)?;
    }
    let out = target_dir().join("hetmem-report");
    std::fs::create_dir_all(&out)?;
    let path = out.join("report.md");
    std::fs::write(&path, &md)?;
    println!("wrote {} ({} groups)", path.display(), groups.len());
    if let Some(to) = copy_to {
        std::fs::write(&to, &md)?;
        println!("copied to {}", to.display());
    }
    Ok(())
}
