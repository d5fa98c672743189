//! Set-up on a fresh machine: the Vulkan loader and Mesa's CPU driver (lavapipe), and a
//! font for the bench report's plots.

use std::path::Path;
use std::process::Command;

/// Installs `libvulkan1` and `mesa-vulkan-drivers` with apt-get when no Vulkan driver is
/// present and we run as root on Debian; otherwise says what is missing and goes on (the
/// engine then falls back to its host device).
pub fn ensure_vulkan_driver() {
    if has_vulkan() {
        return;
    }
    if !can_apt() {
        eprintln!(
            "xtask: no Vulkan driver found; install libvulkan1 and mesa-vulkan-drivers \
             for the Vulkan path (continuing: hetmem falls back to its host device)"
        );
        return;
    }
    eprintln!("xtask: installing the Vulkan loader and lavapipe (apt-get)...");
    if !apt_install(&["libvulkan1", "mesa-vulkan-drivers"]) {
        eprintln!("xtask: apt-get failed; continuing without Vulkan");
    }
}

#[cfg(feature = "full")]
/// Installs the DejaVu fonts the report's plots are labelled with, when missing and we may.
pub fn ensure_plot_font() {
    if Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists() || !can_apt() {
        return;
    }
    eprintln!("xtask: installing fonts-dejavu-core for the plots (apt-get)...");
    if !apt_install(&["fonts-dejavu-core"]) {
        eprintln!("xtask: apt-get failed; the report will have no plots");
    }
}

/// Root on a machine with apt-get.
fn can_apt() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    root && Path::new("/usr/bin/apt-get").exists()
}

/// `apt-get update`, then `apt-get install -y` of `packages`; true on success.
fn apt_install(packages: &[&str]) -> bool {
    Command::new("apt-get")
        .arg("update")
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
}

fn has_vulkan() -> bool {
    let loader = [
        "/usr/lib/x86_64-linux-gnu/libvulkan.so.1",
        "/usr/lib/aarch64-linux-gnu/libvulkan.so.1",
        "/usr/lib/libvulkan.so.1",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    let icd = Path::new("/usr/share/vulkan/icd.d")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some());
    loader && icd
}
