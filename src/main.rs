//! The `segmentd` binary: everything is in the library; see `segmentd --help`.

/// mimalloc: the per-event path allocates many small, short-lived strings, and the benches
/// (`benches/engine.rs` uses it too) measure it faster than the system allocator. Built
/// without transparent huge pages (`no_thp` in Cargo.toml): see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    segmentd::cli::main()
}
