//! `cargo xtask`: the project's task runner.
//!
//! - `cargo xtask demo`: set up what is missing, then run the demo.
//! - `cargo xtask test`: set up what is missing, then run every test of the workspace and a
//!   short soak per device and memory kind.
//! - `cargo xtask soak`: threads of random operations against a shadow model, with faults
//!   injected (see `hetmem_tests::soak`).
//! - `cargo xtask bench-report`: tables and plots of the last `cargo bench` results, with
//!   ratios.

mod demo;
mod plots;
mod report;
mod setup;
mod soak;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "hetmem tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the demo (installs the Vulkan driver for the CPU if it is missing and we may).
    Demo(demo::Args),
    /// Write target/hetmem-report/report.md from the results of `cargo bench`.
    BenchReport {
        /// The machine and device the results come from, for the report's header.
        #[arg(long)]
        machine: Option<String>,
        /// Also copy the report to this path (e.g. to commit it).
        #[arg(long)]
        copy_to: Option<std::path::PathBuf>,
    },
    /// Threads of random operations through the migration API and the driver, with failed
    /// copies and memory exhaustion injected, checked against a shadow model.
    Soak(soak::Args),
    /// Run the whole test suite (installs the Vulkan driver for the CPU if missing).
    Test {
        /// Extra arguments passed to `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Demo(args) => {
            setup::ensure_vulkan_driver();
            demo::run(args)
        }
        Task::BenchReport { machine, copy_to } => {
            setup::ensure_plot_font();
            report::run(machine, copy_to)
        }
        Task::Soak(args) => {
            setup::ensure_vulkan_driver();
            soak::run(&args)
        }
        Task::Test { args } => {
            setup::ensure_vulkan_driver();
            let status = std::process::Command::new(env!("CARGO"))
                .args(["test", "--workspace", "--all-targets"])
                .args(&args)
                .env("NODEVICE_SELECT", "1")
                .status()?;
            if !status.success() {
                bail!("tests failed");
            }
            let status = std::process::Command::new(env!("CARGO"))
                .args(["test", "--workspace", "--doc"])
                .env("NODEVICE_SELECT", "1")
                .status()?;
            if !status.success() {
                bail!("doc tests failed");
            }
            soak::ci()
        }
    }
}
