//! loom models of hetmem's lock protocols, over the real protocol code (see the crate docs
//! and `docs/ARCHITECTURE.md`, "Models of the lock protocols"). Each model has a sibling
//! broken on purpose in one place, which loom must be seen to catch: a model that finds
//! nothing proves something only if it can find the bug it is there for.

#![cfg(loom)]

#[path = "../../../migrate/src/mm/sync.rs"]
mod sync;

#[allow(dead_code, reason = "the models use part of the module")]
#[path = "../../../migrate/src/mm/page_lock.rs"]
mod page_lock;

#[path = "../../../engine/src/retire.rs"]
mod retire;

mod fault;
mod lock;
mod retirement;

/// Runs the model broken on purpose that the ignored test `name` (its path in this test
/// binary) holds, in a child process of this binary, and returns what it printed; fails if
/// the model passes. A child, because a loom failure can abort rather than unwind (a
/// deadlock found while threads hold loom locks panics again in their destructors).
pub(crate) fn failure_of(name: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running the test binary");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("running 1 test"),
        "no test named {name}: {report}"
    );
    assert!(
        !out.status.success(),
        "loom found no failure in {name}, a model broken on purpose: {report}"
    );
    report
}
