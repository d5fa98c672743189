//! # hetmem-models
//!
//! loom models of hetmem's lock protocols. The models live in `tests/loom/` and run only
//! under `--cfg loom` (without it this crate and its test target are empty):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test --release -p hetmem-models --test loom
//! ```
//!
//! They compile the protocol files of the real crates with `#[path]`, not copies:
//! `migrate/src/mm/page_lock.rs` (the page lock with its waiter bit and parking, the
//! reverse map's bit lock, reference counts) over `migrate/src/mm/sync.rs` (which is
//! loom's atomics and a modelled wait queue under `--cfg loom`), and
//! `engine/src/retire.rs` (ticket retirement). Each model has a sibling that breaks the
//! protocol on purpose in one place, and a test that checks loom reports that failure.
